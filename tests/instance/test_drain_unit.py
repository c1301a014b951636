"""The drain's steps on plain fakes and a fake clock: what is handed back, what finishes in place,
what happens at the grace period's end, and a prefill node waiting for its prefills and bookings."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from scheduler.node_commands import Activity, NodeStatus
from splitwise.counters import Counters
from splitwise.instance.drain import Drainer, DrainReport
from splitwise.testing.fake_clock import FakeClock


@dataclass
class FakeRuntime:
    """Requests by id: streaming or not; ``finish_at`` (fake seconds) ends one by itself."""

    clock: FakeClock
    streaming: set[str] = field(default_factory=set)
    queued: set[str] = field(default_factory=set)
    finish_at_s: dict[str, float] = field(default_factory=dict)
    handed_back: list[tuple[str, str]] = field(default_factory=list)
    accepting: bool = True

    def in_flight(self) -> list[str]:
        now = self.clock.monotonic()
        for req_id, at in list(self.finish_at_s.items()):
            if now >= at:
                self.streaming.discard(req_id)
                del self.finish_at_s[req_id]
        return sorted(self.streaming | self.queued)

    def is_streaming(self, req_id: str) -> bool:
        return req_id in self.streaming

    def hand_back(self, req_id: str, reason: str) -> bool:
        if req_id not in self.streaming and req_id not in self.queued:
            return False
        self.handed_back.append((req_id, reason))
        self.streaming.discard(req_id)
        self.queued.discard(req_id)
        return True

    async def wait_idle(self, req_ids: list[str]) -> None:
        return None


@dataclass
class FakeNode:
    statuses: list[NodeStatus] = field(default_factory=list)

    async def set_status(self, status: NodeStatus) -> None:
        self.statuses.append(status)


DRAINING = NodeStatus(Activity.DRAINING, "test", "pytest", 1)


def run(coro: Coroutine[Any, Any, DrainReport]) -> DrainReport:
    return asyncio.run(coro)


def test_queued_work_is_handed_back_at_once_and_running_work_finishes_in_place() -> None:
    clock = FakeClock()
    runtime = FakeRuntime(clock, streaming={"r1", "r2"}, queued={"q1"})
    runtime.finish_at_s = {"r1": clock.monotonic() + 2, "r2": clock.monotonic() + 5}
    node, counters = FakeNode(), Counters()
    report = run(Drainer(runtime, node, counters, clock=clock).drain(DRAINING, grace_s=30))
    assert runtime.accepting is False
    assert node.statuses == [DRAINING]  # out of dispatch first
    assert runtime.handed_back == [("q1", "node is draining")]
    assert report.handed_back == 1 and report.finished_in_place == 2 and not report.grace_expired
    assert counters.get("drains_started") == counters.get("drains_completed") == 1
    assert counters.get("requests_finished_in_place") == 2
    assert clock.monotonic() - 1000 < 30  # it did not sit out the grace period


def test_grace_over_hands_back_what_still_runs() -> None:
    clock = FakeClock()
    runtime = FakeRuntime(clock, streaming={"fast", "slow"})
    runtime.finish_at_s = {"fast": clock.monotonic() + 1, "slow": clock.monotonic() + 100}
    counters = Counters()
    report = run(Drainer(runtime, FakeNode(), counters, clock=clock).drain(DRAINING, grace_s=10))
    assert [r for r, _ in runtime.handed_back] == ["slow"]
    assert "grace period over" in runtime.handed_back[0][1]
    assert report.grace_expired and report.finished_in_place == 1
    assert counters.get("requests_handed_back") == 1 and counters.get("drain_grace_expired") == 1


def test_grace_zero_hands_back_everything_and_keeps_remote_prefills_out_of_the_first_pass() -> None:
    clock = FakeClock()
    runtime = FakeRuntime(clock, streaming={"run"}, queued={"wait", "remote"})
    drainer = Drainer(runtime, FakeNode(), Counters(), clock=clock, in_remote_prefill=lambda r: r == "remote")
    report = run(drainer.drain(DRAINING, grace_s=0))
    # first pass: only the queued one not being prefilled remotely; the grace end: the rest
    assert runtime.handed_back[0] == ("wait", "node is draining")
    assert {r for r, _ in runtime.handed_back[1:]} == {"remote", "run"}
    assert report.handed_back == 3


def test_prefill_node_waits_for_its_prefills_and_bookings() -> None:
    clock = FakeClock()
    runtime = FakeRuntime(clock)
    done_at = clock.monotonic() + 3
    checks: list[float] = []

    async def busy() -> bool:
        checks.append(clock.monotonic())
        return clock.monotonic() < done_at

    report = run(Drainer(runtime, FakeNode(), Counters(), clock=clock, prefill_busy=busy).drain(DRAINING, 30))
    assert not report.grace_expired
    assert done_at <= clock.monotonic() < done_at + 1  # waited exactly until it was idle
    assert len(checks) > 2


def test_migration_outcomes_are_counted_when_the_runtime_migrates() -> None:
    @dataclass
    class Outcome:
        ok: bool

    clock = FakeClock()

    class MigratingRuntime(FakeRuntime):
        async def migrate_all_out(self, reason: str) -> list[Outcome]:
            self.streaming.discard("m1")
            return [Outcome(True), Outcome(False)]

    runtime = MigratingRuntime(clock, streaming={"m1", "m2"})
    runtime.finish_at_s = {"m2": clock.monotonic() + 1}
    counters = Counters()
    report = run(Drainer(runtime, FakeNode(), counters, clock=clock).drain(DRAINING, 30))
    assert report.migrated == 1 and report.migrations_failed == 1 and report.finished_in_place == 1
    assert counters.get("requests_migrated") == 1


# --------------------------------------------------------------------------- node commands


def test_node_commands_round_trip_through_the_codec() -> None:
    from scheduler.messages import CONTROL_TYPES, DrainRequest, RoleChangeRequest, decode, encode
    from splitwise.codes import Role

    drain = DrainRequest("c1", "inc1", "rolling restart", "cli:me@host", 12.5, 1700)
    role = RoleChangeRequest("c2", "inc1", "planner: prompt-heavy", "planner", 30.0, 1800, role=Role.PREFILL)
    assert decode(encode(drain), CONTROL_TYPES) == drain
    back = decode(encode(role), CONTROL_TYPES)
    assert back == role and back.role is Role.PREFILL


def test_a_role_change_names_a_known_role() -> None:
    import pytest

    from scheduler.messages import RoleChangeRequest

    with pytest.raises(ValueError, match="'router' is not one of"):
        RoleChangeRequest("c", "i", "r", "me", 1.0, 1, role="router")  # type: ignore[arg-type]


def test_commands_for_another_incarnation_are_dropped_and_early_ones_kept() -> None:
    from scheduler.messages import DrainRequest
    from scheduler.node_commands import NodeCommands

    counters = Counters()
    commands = NodeCommands(counters)
    seen: list[object] = []
    old = DrainRequest("c0", "previous-life", "r", "me", 1.0, 1)
    mine = DrainRequest("c1", "now", "r", "me", 1.0, 2)
    commands.receive(old, "now")
    commands.receive(mine, "now")  # before the instance set its handler: kept
    commands.set_handler(seen.append)
    assert seen == [mine]
    assert counters.get("commands_stale") == 1 and counters.get("commands_received") == 1
