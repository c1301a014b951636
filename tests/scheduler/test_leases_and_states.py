"""Deterministic unit tests with the fake clock: leases, death decisions, state machines, retry."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from scheduler.errors import SchedulerConnectionError
from scheduler.frontend_record import FrontendRecord
from scheduler.lease import LeaseWatch, ServerClock
from scheduler.messages import Assignment, SubmitRequest, WorkItem
from scheduler.metrics import Counters
from scheduler.node_record import HeldWork
from scheduler.retry import Retrier
from scheduler.states import NODE_TRANSITIONS, FrontendState, NodeState, transition
from scheduler.streams import ResultStream
from splitwise.engine.sampling_params import SamplingParams
from splitwise.testing.fake_clock import FakeClock


def test_lease_death_needs_a_second_look_after_grace() -> None:
    watch = LeaseWatch(grace_ms=1000)
    assert not watch.observe("n|1", expiry_ms=5000, now_ms=4000)  # alive
    assert not watch.observe("n|1", expiry_ms=5000, now_ms=5000)  # lapsed: first look
    assert not watch.observe("n|1", expiry_ms=5000, now_ms=5999)  # still within grace
    assert watch.observe("n|1", expiry_ms=5000, now_ms=6000)  # lapsed for the whole grace: dead


def test_a_late_beat_inside_grace_is_no_death() -> None:
    """A starved heartbeat that lands late renews the lease: nothing is decided."""
    watch = LeaseWatch(grace_ms=1000)
    assert not watch.observe("n|1", expiry_ms=5000, now_ms=5200)
    assert not watch.observe("n|1", expiry_ms=8200, now_ms=5900)  # the late beat came in
    assert not watch.observe("n|1", expiry_ms=8200, now_ms=7000)
    assert not watch.observe("n|1", expiry_ms=8200, now_ms=8200)  # lapse starts afresh here
    assert watch.observe("n|1", expiry_ms=8200, now_ms=9200)


def test_an_unseen_renewal_between_two_lapsed_looks_restarts_the_lapse() -> None:
    """A transient lapse, a renewal we never observed, then the participant really dies: the
    lapse is counted from the last lease's expiry, not from the earlier transient look."""
    watch = LeaseWatch(grace_ms=1000)
    assert not watch.observe("fe", expiry_ms=5000, now_ms=5100)  # transient lapse (a late beat)
    assert not watch.observe("fe", expiry_ms=6500, now_ms=6600)  # renewed to 6500 meanwhile, then died
    assert not watch.observe("fe", expiry_ms=6500, now_ms=7499)  # 999 ms after the real expiry
    assert watch.observe("fe", expiry_ms=6500, now_ms=7500)


def test_missing_lease_counts_as_lapsed_and_retain_bounds_memory() -> None:
    watch = LeaseWatch(grace_ms=500)
    assert not watch.observe("fe-a", expiry_ms=None, now_ms=100)
    assert watch.observe("fe-a", expiry_ms=None, now_ms=600)
    watch.observe("fe-b", expiry_ms=None, now_ms=600)
    watch.retain({"fe-a"})
    assert not watch.observe("fe-b", expiry_ms=None, now_ms=700)  # forgotten: a new first look


def test_server_clock_follows_the_measured_offset() -> None:
    clock = FakeClock(start_ms=10_000)
    server = ServerClock(clock)
    server.observe(12_500)
    assert server.now_ms() == 12_500
    clock.advance(1.0)
    assert server.now_ms() == 13_500


def _record() -> FrontendRecord:
    return FrontendRecord(
        request=SubmitRequest(req_id="r0", prompt_token_ids=[1]),
        model_id="m",
        stream=ResultStream("r0"),
        created_ms=0,
        deadline_ms=1000,
    )


def test_frontend_record_transitions_and_illegal_ones_are_counted() -> None:
    stats = Counters()
    fl = _record()
    assert fl.move(FrontendState.QUEUED, stats, why="dispatched")
    assert fl.move(FrontendState.RUNNING, stats, why="first token")
    assert fl.move(FrontendState.PENDING, stats, why="node lost")
    assert fl.move(FrontendState.QUEUED, stats, why="placed again")
    assert fl.move(FrontendState.CANCELLED, stats, why="client gone")
    assert stats.get("illegal_transitions") == 0
    # a terminal record never moves again; the attempt is counted, never silent
    assert not fl.move(FrontendState.RUNNING, stats, why="late token")
    assert not fl.move(FrontendState.FINISHED, stats, why="late terminal")
    assert fl.state is FrontendState.CANCELLED
    assert stats.get("illegal_transitions") == 2


def test_node_record_transitions() -> None:
    stats = Counters()
    work = WorkItem(
        req_id="r0",
        prompt_token_ids=[1],
        sampling_params=SamplingParams(),
        frontend_id="fe",
        created_ms=0,
        deadline_ms=1,
        attempt=0,
        resume_token_ids=[],
        assignment=Assignment(mode="mixed", prefill_node_id="m0", decode_node_id="m0"),
    )
    held = HeldWork(work)
    assert transition(held, NodeState.RUNNING, NODE_TRANSITIONS, stats, why="decoding")
    assert transition(held, NodeState.ORPHANED, NODE_TRANSITIONS, stats, why="frontend_lost")
    assert not transition(held, NodeState.RUNNING, NODE_TRANSITIONS, stats, why="late")
    assert stats.get("illegal_transitions") == 1


def test_retrier_loop_survives_errors_and_backs_off_on_the_fake_clock() -> None:
    clock = FakeClock()
    stats = Counters()
    retrier = Retrier(clock, stats)
    calls = []

    async def step() -> None:
        calls.append(clock.time_ms())
        if len(calls) == 1:
            raise RedisConnectionError("down")
        if len(calls) == 2:
            raise ValueError("one bad message")

    async def body() -> None:
        await retrier.loop("demo", step, running=lambda: len(calls) < 4)

    asyncio.run(body())
    assert len(calls) == 4
    assert stats.get("redis_errors") == 1 and stats.get("demo_errors") == 1
    assert len(clock.sleeps) == 2 and all(0 < s <= retrier.cap_s for s in clock.sleeps)


def test_retrier_call_gives_up_after_its_budget() -> None:
    clock = FakeClock()
    stats = Counters()
    retrier = Retrier(clock, stats)

    async def always_down() -> None:
        raise RedisConnectionError("down")

    with pytest.raises(SchedulerConnectionError, match="publish: Redis unavailable"):
        asyncio.run(retrier.call("publish", always_down, give_up_after_s=3.0))
    assert sum(clock.sleeps) >= 3.0 - retrier.cap_s
    assert stats.get("redis_errors") == len(clock.sleeps) + 1
