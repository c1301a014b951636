"""Failure handling against a real redis-server: node death, Redis restart, expiry, poison, cancellation."""

from __future__ import annotations

import asyncio
import dataclasses

from scheduler_support import booked, cluster, dispatched_pair, eventually, request_events, run, wait_for

from scheduler.config import SchedulerConfig
from scheduler.messages import Cancelled, Expired, Failed, Finished, SubmitRequest, TokenChunk
from scheduler.sim_node import SimBehavior, sim_token
from splitwise.engine.sampling_params import SamplingParams
from splitwise.testing.redis_server import RedisServer


def _tokens(msgs: list) -> list[int]:
    return [t for m in msgs if isinstance(m, TokenChunk) for t in m.token_ids]


def test_node_killed_mid_request_is_redispatched_and_finishes(config: SchedulerConfig, sim_processes) -> None:
    """SIGKILL the decode process serving requests; they resume on the other decode node, and every
    client sees each token exactly once."""
    slow = ("--token-delay-ms", "40")
    sim_processes("p0", "prefill")
    procs = {nid: sim_processes(nid, "decode", *slow) for nid in ("d0", "d1")}

    async def body() -> None:
        async with cluster(config) as c:
            fe = await c.add_frontend()
            prompts = {f"r{i}": [i + 1, 2, 3] for i in range(4)}
            streams = {
                rid: await fe.submit(
                    SubmitRequest(
                        req_id=rid, prompt_token_ids=p, sampling_params=SamplingParams(max_tokens=20)
                    )
                )
                for rid, p in prompts.items()
            }
            first = await streams["r0"].__anext__()  # r0 is running: it has produced a token
            assert isinstance(first, TokenChunk)
            victim = fe.inflight["r0"].assignment.decode_node_id
            procs[victim].kill()
            results = {
                rid: [first] + await s.collect() if rid == "r0" else await s.collect()
                for rid, s in streams.items()
            }
            for rid, msgs in results.items():
                assert isinstance(msgs[-1], Finished), (rid, msgs[-1])
                assert _tokens(msgs) == [sim_token(prompts[rid], i) for i in range(20)], rid
                assert sum(1 for m in msgs if m.is_terminal) == 1
            assert fe.stats.get("redispatched") >= 1
            await fe.flush_records()
            recorded = await request_events(fe, "r0")
            events = [e["event"] for e in recorded]
            assert "redispatched" in events and events[-1] == "finished", events
            survivor = "d1" if victim == "d0" else "d0"
            assert dispatched_pair(recorded)[1] == survivor

    run(body())


def test_redispatch_budget_exhausted_fails_explicitly(config: SchedulerConfig, sim_processes) -> None:
    config = dataclasses.replace(config, max_redispatch=0)
    proc = sim_processes("m0", "mixed", "--token-delay-ms", "50")

    async def body() -> None:
        async with cluster(config) as c:
            fe = await c.add_frontend()
            stream = await fe.submit(
                SubmitRequest(
                    req_id="r0", prompt_token_ids=[1], sampling_params=SamplingParams(max_tokens=50)
                )
            )
            assert isinstance(await stream.__anext__(), TokenChunk)
            proc.kill()
            msgs = await stream.collect()
            assert isinstance(msgs[-1], Failed) and msgs[-1].code == "node_lost", msgs[-1]
            assert "--max-redispatch 0" in msgs[-1].message

    run(body())


def test_redis_restart_nodes_reregister_and_requests_flow(
    config: SchedulerConfig, redis_server: RedisServer
) -> None:
    async def body() -> None:
        async with cluster(config) as c:
            await c.add_node("p0", "prefill")
            await c.add_node("d0", "decode", behavior=SimBehavior(num_tokens=30, token_delay_s=0.05))
            fe = await c.add_frontend()
            msgs = await (await fe.submit(SubmitRequest(req_id="before", prompt_token_ids=[1]))).collect()
            assert isinstance(msgs[-1], Finished)
            inflight = await fe.submit(SubmitRequest(req_id="during", prompt_token_ids=[5, 6]))
            assert isinstance(await inflight.__anext__(), TokenChunk)
            redis_server.restart()  # same port, empty data set
            await wait_for(
                lambda: all(n.agent.stats.get("reregistered") >= 1 for n in c.nodes.values()),
                what="nodes to re-register",
            )
            rest = await inflight.collect()  # re-dispatched with its resume tokens, or an explicit error
            assert rest[-1].is_terminal
            if isinstance(rest[-1], Finished):
                assert len(_tokens(rest)) + 1 == 30
            assert fe.stats.get("redis_restarts") == 1
            for i in range(3):
                after = await (
                    await fe.submit(
                        SubmitRequest(
                            req_id=f"after{i}",
                            prompt_token_ids=[2],
                            sampling_params=SamplingParams(max_tokens=2),
                        )
                    )
                ).collect()
                assert isinstance(after[-1], Finished), after[-1]

    run(body())


def test_ttl_expiry_is_an_explicit_terminal(config: SchedulerConfig) -> None:
    async def body() -> None:
        async with cluster(config) as c:
            await c.add_node("m0", "mixed", serve=False)  # takes nothing: the request can only expire
            fe = await c.add_frontend()
            stream = await fe.submit(SubmitRequest(req_id="r0", prompt_token_ids=[1], ttl_s=0.3))
            msgs = await stream.collect()
            assert msgs == [Expired(req_id="r0", attempt=0)]
            await fe.flush_records()
            assert [e["event"] for e in await request_events(fe, "r0")][-1] == "expired"
            # the booking is released at once, not left to its TTL
            assert await booked(fe) == {}

    run(body())


def test_poison_messages_go_to_dead_letters_and_loops_survive(config: SchedulerConfig) -> None:
    async def body() -> None:
        async with cluster(config) as c:
            await c.add_node("m0", "mixed")
            fe = await c.add_frontend()
            r = fe._client
            await r.xadd(fe.keys.work("m0"), {"m": b"\x93not-a-message"})
            await r.xadd(fe.keys.results(fe.frontend_id), {"m": b"\x81\xa1v\x63"})  # {"v": 99}
            await r.xadd(fe.keys.control("m0"), {"m": b"junk"})
            await r.hset(fe.keys.nodes, "ghost", b"\x00")
            await r.zadd(fe.keys.alive, {"ghost|x": fe.server_clock.now_ms() + 60_000})
            await eventually(lambda: r.xlen(fe.keys.dead_letters), 4)
            letters = {
                e[b"source"].decode().split(":")[0]: e[b"reason"].decode()
                for _id, e in await r.xrange(fe.keys.dead_letters)
            }
            assert set(letters) == {"work", "results", "ctl", "nodes"}, letters
            assert "not a message envelope" in letters["results"] or "not msgpack" in letters["results"]
            assert await r.hget(fe.keys.nodes, "ghost") is None
            assert await r.zscore(fe.keys.alive, "ghost|x") is None
            assert c.nodes["m0"].agent.stats.get("dead_letters") == 2 and fe.stats.get("dead_letters") == 2
            for i in range(3):  # every loop is still alive
                msgs = await (await fe.submit(SubmitRequest(req_id=f"r{i}", prompt_token_ids=[1]))).collect()
                assert isinstance(msgs[-1], Finished)

    run(body())


def test_cancellation_reaches_prefill_and_decode_nodes(config: SchedulerConfig) -> None:
    async def body() -> None:
        async with cluster(config) as c:
            p0 = await c.add_node("p0", "prefill")
            d0 = await c.add_node("d0", "decode", behavior=SimBehavior(num_tokens=500, token_delay_s=0.02))
            fe = await c.add_frontend()
            stream = await fe.submit(SubmitRequest(req_id="r0", prompt_token_ids=[1, 2]))
            assert isinstance(await stream.__anext__(), TokenChunk)
            assert await fe.cancel("r0") is True
            msgs = await stream.collect()
            assert isinstance(msgs[-1], Cancelled) and len(msgs) >= 1
            await wait_for(lambda: not d0.agent.holds("r0"), what="decode node to drop r0")
            await wait_for(
                lambda: p0.agent.stats.get("cancels_received") == 1, what="prefill node to hear it"
            )
            assert d0.agent.is_cancelled("r0", 0)
            assert await fe.cancel("r0") is False  # already over
            # cancelled before any node took it: the queued entry is removed, never run
            d1 = await c.add_node("d1", "decode", serve=False)
            await d0.agent.close()
            queued = await fe.submit(SubmitRequest(req_id="r1", prompt_token_ids=[1]))
            await fe.cancel("r1")
            assert isinstance((await queued.collect())[-1], Cancelled)
            assert await fe._client.xlen(fe.keys.work("d1")) == 0  # XDEL'ed before d1 read it
            assert not d1.agent.holds("r1")

    run(body())


def test_cancel_iterator_yields_cancel_messages(config: SchedulerConfig) -> None:
    async def body() -> None:
        async with cluster(config) as c:
            d0 = await c.add_node("m0", "mixed", serve=False)
            fe = await c.add_frontend()
            await fe.submit(SubmitRequest(req_id="r0", prompt_token_ids=[1]))
            work = await d0.agent.next_work()
            await fe.cancel("r0")
            it = d0.agent.cancellations()
            msg = await asyncio.wait_for(it.__anext__(), 10)
            assert (msg.req_id, msg.attempt, msg.reason) == ("r0", 0, "cancelled")
            await d0.agent.ack(work)
            assert await eventually(lambda: booked(fe), {}) == {}

    run(body())


def test_ack_without_terminal_is_redispatched_not_left_to_the_ttl(config: SchedulerConfig) -> None:
    async def body() -> None:
        async with cluster(config) as c:
            m0 = await c.add_node("m0", "mixed", serve=False)
            fe = await c.add_frontend()
            stream = await fe.submit(SubmitRequest(req_id="r0", prompt_token_ids=[1, 2]))
            first = await m0.agent.next_work()
            await m0.agent.ack(first)  # the engine gave up without publishing anything
            second = await m0.agent.next_work()  # the frontend re-dispatched it
            assert (second.req_id, second.attempt) == ("r0", 1)
            await m0.agent.publish(
                Finished(req_id="r0", attempt=1, finish_reason="stop", prompt_tokens=2, completion_tokens=0)
            )
            await m0.agent.ack(second)
            assert isinstance((await stream.collect())[-1], Finished)
            assert m0.agent.stats.get("acked_without_terminal") == 1

    run(body())
