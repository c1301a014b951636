"""InstanceControl: what an instance does with a drain, a SIGTERM or a role change.

    DrainRequest | first SIGTERM  -> drain (splitwise/instance/drain.py) -> the instance's own
                                     frontend requests finish (HTTP stops listening) -> stop -> exit 0
    second SIGTERM | SIGINT       -> stop at once (as before drains existed)
    RoleChangeRequest             -> drain (state "switching") -> role_switch.switch_role -> serving

One command runs at a time (the event loop owns this object); a command that arrives while one
runs is refused (logged, counted ``node_commands_refused``), except that a drain or a SIGTERM during
a role switch stops the instance once the switch's drain is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from scheduler.clock import SYSTEM_CLOCK, Clock
from scheduler.messages import DrainRequest, NodeCommand, RoleChangeRequest
from scheduler.node_commands import Activity, NodeStatus
from splitwise.codes import Role
from splitwise.instance.drain import POLL_S, Drainer
from splitwise.instance.handoff_state import DecodeState
from splitwise.logging import get_logger

if TYPE_CHECKING:
    from splitwise.instance.instance import Instance

log = get_logger(__name__)


class InstanceControl:
    def __init__(self, instance: Instance, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.instance = instance
        self.clock = clock
        self.status = NodeStatus()
        self._task: asyncio.Task[None] | None = None
        self._num_sigterms = 0
        self._exit_after = False  # a drain arrived during a role switch: stop once it is done

    @property
    def is_serving(self) -> bool:
        return self.status.activity is Activity.SERVING

    @property
    def is_busy(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- entry points (event loop) ------------------------------------------------------------

    def on_command(self, command: NodeCommand) -> None:
        """A node command from the control stream (NodeCommands' handler)."""
        if isinstance(command, DrainRequest):
            self.drain(command.grace_s, reason=command.reason, requested_by=command.requested_by)
        elif isinstance(command, RoleChangeRequest):
            if self.is_busy:
                self._refuse(command.TYPE)
                return
            self._run(
                self._switch(command.role, command.grace_s, command.reason, command.requested_by),
                "role-switch",
            )

    def on_sigterm(self) -> None:
        self._num_sigterms += 1
        if self._num_sigterms > 1:
            log.warning("second SIGTERM: stopping now")
            self.instance.counters.inc("drains_cut_short")
            self.instance.request_stop()
            return
        grace_s = self.instance.config.drain_grace_period_s
        self.drain(grace_s, reason="SIGTERM", requested_by=f"signal (--drain-grace-period {grace_s:g})")

    def drain(self, grace_s: float, *, reason: str, requested_by: str) -> None:
        if self.is_busy:
            if self.status.activity is Activity.SWITCHING:
                log.warning("drain requested during a role switch: stopping once it drained")
                self._exit_after = True
                return
            self._refuse("drain")
            return
        if self.instance.node is None or self.instance.runtime is None:
            self.instance.request_stop()  # not started yet: nothing to drain
            return
        self._run(self._drain_and_exit(grace_s, reason, requested_by), "drain")

    # -- the work -----------------------------------------------------------------------------

    async def _drain_and_exit(self, grace_s: float, reason: str, requested_by: str) -> None:
        deadline = self.clock.monotonic() + grace_s
        self.status = NodeStatus(Activity.DRAINING, reason, requested_by, self.clock.time_ms())
        await self._drainer().drain(self.status, grace_s)
        await self._finish_own_requests(deadline)
        log.info("drained; stopping", reason=reason)
        self.instance.request_stop()

    async def _switch(self, role: Role, grace_s: float, reason: str, requested_by: str) -> None:
        from splitwise.instance.role_switch import RoleSwitchError, switch_role

        inst = self.instance
        if role == inst.config.role:
            log.info("role change to the current role: nothing to do", role=role)
            return
        self.status = NodeStatus(
            Activity.SWITCHING, reason, requested_by, self.clock.time_ms(), target_role=role.value
        )
        try:
            await self._drainer().drain(self.status, grace_s)
            if self._exit_after:
                inst.request_stop()
                return
            await switch_role(inst, role)
        except RoleSwitchError as exc:
            inst.counters.inc("role_switches_failed")
            log.error("role switch failed; stopping (the process exits 1)", error=str(exc))
            inst.fatal_reason = f"role switch to {role} failed: {exc}"
            inst.request_stop()
            return
        self.status = NodeStatus()
        inst.counters.inc("role_switches")

    async def _finish_own_requests(self, deadline: float) -> None:
        """Clients of this instance's HTTP server: stop listening (a load balancer saw /health
        go 503 already), let their requests finish until the deadline; then the frontend's close
        ends what is left with an explicit error (scheduler_closed)."""
        inst = self.instance
        for server in getattr(inst.http_server, "servers", []):
            server.close()  # the listening socket; open connections go on
        while inst.frontend is not None and inst.frontend.num_inflight and self.clock.monotonic() < deadline:
            await self.clock.sleep(POLL_S)
        left = inst.frontend.num_inflight if inst.frontend is not None else 0
        if left:
            inst.counters.inc("drain_frontend_requests_ended", left)
            log.warning("grace period over: ending this instance's own requests", requests=left)

    def _drainer(self) -> Drainer:
        inst = self.instance
        assert inst.runtime is not None
        flow, prefill = inst.decode_flow, inst.prefill_flow

        def in_remote_prefill(req_id: str) -> bool:
            # The flow keys its records by hand-off id (request and attempt): any attempt counts.
            records = flow.records.values() if flow is not None else ()
            return any(
                rec.req_id == req_id and rec.is_in(DecodeState.PREFILLING, DecodeState.LANDED)
                for rec in records
            )

        async def prefill_busy() -> bool:
            assert prefill is not None
            return bool(prefill.records) or await inst.node.booked_prompt_tokens() > 0

        return Drainer(
            inst.runtime,
            _StatusNode(inst.node),
            inst.counters,
            in_remote_prefill=in_remote_prefill,
            prefill_busy=prefill_busy if prefill is not None else None,
            clock=self.clock,
        )

    def _run(self, work: Coroutine[Any, Any, None], name: str) -> None:
        self._task = asyncio.get_running_loop().create_task(self._guard(work), name=name)

    async def _guard(self, work: Coroutine[Any, Any, None]) -> None:
        """This task's error boundary: a bug in a drain must not leave a node half out of service."""
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - logged; the instance stops (exit 1)
            log.exception("drain or role switch failed", error=str(exc))
            self.instance.fatal_reason = f"drain or role switch failed: {type(exc).__name__}: {exc}"
            self.instance.request_stop()

    def _refuse(self, what: str) -> None:
        self.instance.counters.inc("node_commands_refused")
        log.warning("node command refused: a drain or role switch is running", command=what)


class _StatusNode:
    """The node side's status, for a scheduler that has one (the local scheduler has none)."""

    def __init__(self, node: Any) -> None:
        self._node = node

    async def set_status(self, status: NodeStatus) -> None:
        if hasattr(self._node, "set_status"):
            await self._node.set_status(status)
