"""Draining a node: it stops taking work and empties itself without a single failed request.

    drain(status, grace_s)                      (a DrainRequest, SIGTERM, or a role switch's first half)
      1. leave dispatch    node.set_status(draining | switching): out of its candidate set at once,
                           shown by `splitwise inspect`; /health answers 503; runtime.accepting =
                           False: a work item that still arrives is handed back at once
      2. hand back queued  every request that has produced no token here and is not in a remote
                           prefill: a retryable ``node_draining`` error, its frontend re-dispatches it
      3. migrate           running decodes move to another decode node (runtime.migrate_all_out,
                           when the runtime has live migration); those that could not move stay
      4. wait (grace_s)    what runs finishes in place; a prefill node finishes its prefills in
                           flight and waits until no prompt tokens are booked on it any more
      5. grace over        whatever still runs is handed back (retryable, resumed after the tokens
                           its client has), and the node is empty

After ``drain`` the caller deregisters and exits (drain, SIGTERM) or switches role in place
(splitwise/instance/role_switch.py). Every step is logged and counted (``drains_started``,
``requests_handed_back``, ``requests_migrated``, ``requests_finished_in_place``, ...).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from scheduler.clock import SYSTEM_CLOCK, Clock
from scheduler.node_commands import NodeStatus
from splitwise.counters import Counters
from splitwise.logging import get_logger

log = get_logger(__name__)

POLL_S = 0.05  # how often the wait re-checks (an idle node is done within one poll)
HAND_BACK_WAIT_S = 10.0  # a handed-back request's task ends within one publish; bounded anyway


class DrainRuntime(Protocol):
    """What the drain needs of NodeRuntime (splitwise/instance/node_runtime.py)."""

    accepting: bool

    def in_flight(self) -> list[str]: ...
    def is_streaming(self, req_id: str) -> bool: ...
    def hand_back(self, req_id: str, reason: str) -> bool: ...
    async def wait_idle(self, req_ids: list[str]) -> None: ...


class DrainNode(Protocol):
    async def set_status(self, status: NodeStatus) -> None: ...


@dataclass
class DrainReport:
    handed_back: int = 0
    migrated: int = 0
    migrations_failed: int = 0
    finished_in_place: int = 0
    grace_expired: bool = False

    def summary(self) -> dict[str, Any]:
        return dict(vars(self))


class Drainer:
    def __init__(
        self,
        runtime: DrainRuntime,
        node: DrainNode,
        counters: Counters,
        *,
        in_remote_prefill: Callable[[str], bool] = lambda _req_id: False,
        prefill_busy: Callable[[], Awaitable[bool]] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.runtime = runtime
        self.node = node
        self.counters = counters
        self.in_remote_prefill = in_remote_prefill  # D: P is computing its KV (do not waste it)
        self.prefill_busy = prefill_busy  # P: prefills in flight or prompt tokens still booked here
        self.clock = clock

    async def drain(self, status: NodeStatus, grace_s: float) -> DrainReport:
        report = DrainReport()
        deadline = self.clock.monotonic() + grace_s
        self.counters.inc("drains_started")
        log.info(
            "drain started",
            state=status.activity.value,
            reason=status.reason,
            requested_by=status.requested_by,
            grace_s=grace_s,
            in_flight=len(self.runtime.in_flight()),
        )
        self.runtime.accepting = False
        await self.node.set_status(status)
        handed = self._hand_back_queued(report)
        await self._migrate(status.reason, report)
        running = set(self.runtime.in_flight()) - handed
        await self._wait(deadline)
        left = self.runtime.in_flight()
        if left or (self.prefill_busy is not None and await self.prefill_busy()):
            report.grace_expired = True
            self.counters.inc("drain_grace_expired")
            log.warning("drain grace period over; handing back what still runs", requests=len(left))
            for req_id in left:
                if self.runtime.hand_back(req_id, f"grace period over ({status.reason})"):
                    report.handed_back += 1
                    self.counters.inc("requests_handed_back")
            await self._bounded_wait(left)
        report.finished_in_place = len(running - set(left))
        self.counters.inc("requests_finished_in_place", report.finished_in_place)
        self.counters.inc("drains_completed")
        log.info("drain done", **report.summary())
        return report

    def _hand_back_queued(self, report: DrainReport) -> set[str]:
        handed: set[str] = set()
        for req_id in self.runtime.in_flight():
            if self.runtime.is_streaming(req_id) or self.in_remote_prefill(req_id):
                continue
            if self.runtime.hand_back(req_id, "node is draining"):
                handed.add(req_id)
                report.handed_back += 1
                self.counters.inc("requests_handed_back")
        return handed

    async def _migrate(self, reason: str, report: DrainReport) -> None:
        migrate_all_out = getattr(self.runtime, "migrate_all_out", None)  # live migration (#16)
        if migrate_all_out is None:
            return
        for outcome in await migrate_all_out(reason):
            if getattr(outcome, "ok", False):
                report.migrated += 1
                self.counters.inc("requests_migrated")
            else:
                report.migrations_failed += 1
                self.counters.inc("drain_migrations_failed")

    async def _wait(self, deadline: float) -> None:
        """Until nothing runs here (and, on a prefill node, nothing is booked) or the deadline."""
        while self.clock.monotonic() < deadline:
            if not self.runtime.in_flight() and (self.prefill_busy is None or not await self.prefill_busy()):
                return
            await self.clock.sleep(POLL_S)

    async def _bounded_wait(self, req_ids: list[str]) -> None:
        try:
            await asyncio.wait_for(self.runtime.wait_idle(req_ids), HAND_BACK_WAIT_S)
        except asyncio.TimeoutError:
            self.counters.inc("drain_hand_back_timeouts")
            log.error("handed-back requests did not end in time", requests=len(req_ids))
