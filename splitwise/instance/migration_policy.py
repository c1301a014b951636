"""Migration policies: when a decode node migrates one of its requests out on its own (#16).

Node side, once per heartbeat interval on every decode node (off unless a flag turns it on)::

    my load + the live compatible decode nodes' last load reports (Redis) -> decide -> migrate_out

- make-room (``--migrate-make-room-free-blocks N``): fewer than N free KV blocks here, so the next
  steps would preempt (drop a request's KV and recompute it): move the request holding the most
  blocks to the peer with the most free blocks, if that peer has room for it (more free blocks
  than it holds, plus N).
- balance (``--migrate-balance-kv-gap G``): my KV usage exceeds the least used peer's by more than
  G (0..1) and I run at least ``--migrate-balance-min-requests`` more requests than it: move my
  newest request there. Only the busier side acts, and one migration moves one request, so two
  nodes never swap the same request back and forth: after it the gap is smaller.

One decision per tick, at most one migration in flight per node: the policy waits for it.
Decisions are pure (``decide``) and tested on plain data; the loop only gathers and acts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from scheduler.messages import NodeInfo
from scheduler.migration import Peer, pick_target
from scheduler.registry import node_group
from splitwise.errors import SplitwiseError
from splitwise.instance.migration_state import MigrationOutcome
from splitwise.logging import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class PolicyConfig:
    make_room_free_blocks: int = 0  # 0: off
    balance_kv_gap: float = 0.0  # 0: off
    balance_min_requests: int = 2

    def __post_init__(self) -> None:
        if self.make_room_free_blocks < 0:
            raise ValueError(f"--migrate-make-room-free-blocks: {self.make_room_free_blocks} must be >= 0")
        if not 0.0 <= self.balance_kv_gap < 1.0:
            raise ValueError(f"--migrate-balance-kv-gap: {self.balance_kv_gap} must be in [0, 1)")
        if self.balance_min_requests < 1:
            raise ValueError(f"--migrate-balance-min-requests: {self.balance_min_requests} must be >= 1")

    @property
    def is_on(self) -> bool:
        return self.make_room_free_blocks > 0 or self.balance_kv_gap > 0


@dataclass(frozen=True)
class Running:
    req_id: str
    num_blocks: int
    started_order: int  # larger: admitted later


@dataclass(frozen=True)
class Decision:
    req_id: str
    target: str
    reason: str  # "make_room" | "balance"
    why: str  # the numbers behind it, for the log


def kv_usage(free_blocks: int, total_blocks: int) -> float:
    return 0.0 if total_blocks <= 0 else 1.0 - free_blocks / total_blocks


def decide(
    cfg: PolicyConfig,
    me: NodeInfo,
    free_blocks: int,
    running: list[Running],
    peers: list[Peer],
) -> Decision | None:
    """What to migrate now, if anything (pure)."""
    if not running:
        return None
    group = node_group(me)
    fits = [p for p in peers if p.info.node_id != me.node_id and node_group(p.info) == group]
    if not fits:
        return None
    if cfg.make_room_free_blocks and free_blocks < cfg.make_room_free_blocks:
        biggest = max(running, key=lambda r: (r.num_blocks, r.started_order))
        best = pick_target(me, fits)
        if best is not None and best.load.free_kv_blocks > biggest.num_blocks + cfg.make_room_free_blocks:
            why = f"free_blocks={free_blocks} < {cfg.make_room_free_blocks}; {best.info.node_id} has {best.load.free_kv_blocks}"
            return Decision(biggest.req_id, best.info.node_id, "make_room", why)
    if cfg.balance_kv_gap:
        mine = kv_usage(free_blocks, me.kv.num_blocks)
        least = min(
            fits, key=lambda p: (kv_usage(p.load.free_kv_blocks, p.info.kv.num_blocks), p.info.node_id)
        )
        theirs = kv_usage(least.load.free_kv_blocks, least.info.kv.num_blocks)
        gap_requests = len(running) - least.load.running_requests
        if mine - theirs > cfg.balance_kv_gap and gap_requests >= cfg.balance_min_requests:
            newest = max(running, key=lambda r: r.started_order)
            why = f"kv_usage {mine:.2f} vs {theirs:.2f} on {least.info.node_id}; requests gap {gap_requests}"
            return Decision(newest.req_id, least.info.node_id, "balance", why)
    return None


Gather = Callable[[], Awaitable[tuple[int, list[Running], list[Peer]]]]
Migrate = Callable[[str, str, str], Awaitable[MigrationOutcome]]  # (req_id, target, reason)


class MigrationPolicy:
    """The periodic loop on a decode node (started by the instance when a policy flag is on)."""

    def __init__(
        self,
        cfg: PolicyConfig,
        me: Callable[[], NodeInfo],
        gather: Gather,
        migrate: Migrate,
        *,
        interval_s: float,
    ) -> None:
        self.cfg = cfg
        self._me = me
        self._gather = gather
        self._migrate = migrate
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self.decisions: list[Decision] = []

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="migration-policy")

    async def tick(self) -> MigrationOutcome | None:
        free_blocks, running, peers = await self._gather()
        decision = decide(self.cfg, self._me(), free_blocks, running, peers)
        if decision is None:
            return None
        self.decisions.append(decision)
        log.info(
            "migration policy decided",
            req_id=decision.req_id,
            target=decision.target,
            reason=decision.reason,
            why=decision.why,
        )
        return await self._migrate(decision.req_id, decision.target, decision.reason)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.tick()
            except SplitwiseError as exc:  # Redis away for a moment: the next tick tries again
                log.warning("migration policy tick failed", error=str(exc))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
