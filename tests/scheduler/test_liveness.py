"""Liveness that a busy loop cannot starve, and work whose frontend died is aborted.

The starvation test blocks the node's event loop from a test hook (a threading.Event the test
releases only after the heartbeat thread has beaten through several leases): no timing guesses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator

import pytest
from scheduler_support import booked, request_events, run, wait_for

from scheduler.config import SchedulerConfig
from scheduler.frontend import FrontendScheduler
from scheduler.messages import Finished, SubmitRequest
from scheduler.node import NodeAgent
from scheduler.sim_frontend import spawn_sim_frontend
from scheduler.sim_node import SimBehavior, SimNode, make_node_info, sim_token


@pytest.fixture()
def node_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop on its own thread: the node lives there, so the test can starve it alone."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


def test_starved_node_loop_keeps_its_lease_and_its_work(
    config: SchedulerConfig, node_loop: asyncio.AbstractEventLoop
) -> None:
    config = dataclasses.replace(config, heartbeat_interval_s=0.2, dead_after_missed=3)

    def on_node(coro):  # type: ignore[no-untyped-def]
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, node_loop))

    async def start_node() -> SimNode:
        agent = NodeAgent(config)
        await agent.start(make_node_info("m0", "mixed"))
        sim = SimNode(agent, SimBehavior(num_tokens=3))
        asyncio.get_running_loop().create_task(sim.run())
        return sim

    async def stop_node(sim: SimNode) -> None:
        await sim.stop()
        await sim.agent.close()

    async def body() -> None:
        sim = await on_node(start_node())
        fe = FrontendScheduler(config, model_id="sim-model")
        await fe.start()
        try:
            release = threading.Event()
            node_loop.call_soon_threadsafe(release.wait, 60)  # the node's loop is stuck from here on
            beats = sim.agent.heartbeater.num_beats
            stream = await fe.submit(SubmitRequest(req_id="r0", prompt_token_ids=[1, 2]))
            # Ten heartbeat periods (more than three leases) with the loop blocked: the beats go on.
            await wait_for(lambda: sim.agent.heartbeater.num_beats >= beats + 10, what="beats while starved")
            assert fe.stats.get("redispatched") == 0 and fe.num_inflight == 1
            release.set()
            msgs = await stream.collect()
            assert isinstance(msgs[-1], Finished), msgs[-1]
            assert sim.served["r0"] == 1  # served once: never re-dispatched, no duplicate prefill
            assert fe.stats.get("redispatched") == 0 and fe.stats.get("illegal_transitions") == 0
        finally:
            await fe.close()
            await on_node(stop_node(sim))

    run(body(), timeout_s=60)


def test_work_of_a_dead_frontend_is_aborted_within_a_lease(config: SchedulerConfig, sim_processes) -> None:  # type: ignore[no-untyped-def]
    """Real processes: a node serving a long request; SIGKILL the frontend that accepted it. The node
    aborts the request once the frontend's lease stayed lapsed for a whole lease: its booking is
    released, an ``orphaned`` record is written and no more tokens are produced."""
    node_grace_ms = config.dead_after_ms  # the sim node process runs with the fixture's config
    config = dataclasses.replace(config, heartbeat_interval_s=0.2, dead_after_missed=3)
    sim_processes("m0", "mixed", "--token-delay-ms", "20")
    frontend, line = spawn_sim_frontend(config, "orphan-1", max_tokens=100_000)
    _, req_id, node_id, frontend_id = line.split()
    assert node_id == "m0"

    async def body() -> None:
        probe = FrontendScheduler(config, model_id="sim-model")
        await probe.start()
        try:
            results = probe.keys.results(frontend_id)
            await wait_for_async(lambda: _xlen(probe, results), lambda n: n > 3, "tokens flowing")
            assert (await booked(probe))["m0"]["decode_requests"] == 1
            frontend.kill()
            frontend.wait(timeout=10)
            assert probe._client is not None
            # The dead frontend's last lease expiry (server ms): nothing extends it any more.
            last_lease_ms = int(await probe._client.zscore(probe.keys.frontends, frontend_id) or 0)
            await wait_for_async(lambda: booked(probe), lambda b: b == {}, "orphan's booking released", 30)
            await wait_for_async(
                lambda: request_events(probe, req_id),
                lambda evs: any(e["event"] == "orphaned" for e in evs),
                "orphaned record",
                10,
            )
            events = [e for e in await request_events(probe, req_id) if e["event"] == "orphaned"]
            assert events[0]["node"] == "m0" and events[0]["detail"] == frontend_id
            # Never early: the lapse must persist for a whole lease after the lease ran out (the
            # node's clock is the server's up to the offset it measures, a few ms on one host).
            aborted_after_ms = int(events[0]["ts_ms"]) - last_lease_ms
            print(f"orphan aborted {aborted_after_ms} ms after the frontend's lease ran out")
            assert aborted_after_ms >= node_grace_ms - 50
            # no more tokens for the dead frontend (its stream may have expired: length 0 then)
            length = await _xlen(probe, results)
            await asyncio.sleep(config.dead_after_ms / 1000)
            assert await _xlen(probe, results) <= length
        finally:
            await probe.close()

    run(body(), timeout_s=90)


async def _xlen(fe: FrontendScheduler, key: str) -> int:
    assert fe._client is not None
    return int(await fe._client.xlen(key))


async def wait_for_async(check, ok, what: str, timeout_s: float = 15.0):  # type: ignore[no-untyped-def]
    """Re-run an async check until ``ok(result)`` (the library itself never polls)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        got = await check()
        if ok(got):
            return got
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}: last {got!r}")
        await asyncio.sleep(0.05)


def test_orphan_abort_of_a_live_frontend_is_redispatched_not_left_hanging(config: SchedulerConfig) -> None:
    """A frontend whose lease lapses while it is alive (its heartbeat thread held up, as on a
    starved host): the node aborts its request as an orphan after a whole lease and says so with a
    retryable error, so the frontend re-dispatches it (resume prefix) and the client gets the whole
    output, each token once, instead of a stream that waits for its TTL."""
    config = dataclasses.replace(config, heartbeat_interval_s=0.2, dead_after_missed=3)
    total = 400

    async def body() -> None:
        agent = NodeAgent(config)
        await agent.start(make_node_info("m0", "mixed"))
        sim = SimNode(agent, SimBehavior(num_tokens=total, token_delay_s=0.01))
        serving = asyncio.get_running_loop().create_task(sim.run())
        fe = FrontendScheduler(config, model_id="sim-model")
        await fe.start()
        held = threading.Event()
        held.set()
        heartbeater = fe._heartbeater
        assert heartbeater is not None
        beat = heartbeater._beat
        # Test hook on the heartbeat thread only: it waits while ``held`` is clear.
        heartbeater._beat = lambda client: (held.wait(60), beat(client))  # type: ignore[method-assign]
        try:
            stream = await fe.submit(SubmitRequest(req_id="r0", prompt_token_ids=[1, 2]))
            first = await stream.__anext__()
            held.clear()  # the frontend's lease lapses from here on; it still reads its results
            await wait_for(lambda: agent.stats.get("orphans_aborted") >= 1, what="orphan abort", timeout_s=30)
            held.set()
            msgs = [first, *await stream.collect()]
            assert isinstance(msgs[-1], Finished), msgs[-1]
            tokens = [t for m in msgs if hasattr(m, "token_ids") for t in m.token_ids]
            assert tokens == [sim_token([1, 2], i) for i in range(total)]
            assert fe.stats.get("redispatched") >= 1 and sim.served["r0"] >= 2
        finally:
            held.set()
            await fe.close()
            await sim.stop()
            await agent.close()
            serving.cancel()

    run(body(), timeout_s=90)
