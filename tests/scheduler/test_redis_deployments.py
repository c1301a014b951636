"""The scheduler on a real 3-master Redis Cluster (the session's ``redis_cluster`` fixture) and on a
real Sentinel deployment (master, replica, three sentinels), including a failover under load.
The P/D equality checks run against the Redis Cluster in tests/instance/test_pd_equivalence.py."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator

import pytest
from scheduler_support import booked, cluster, eventually, run

from scheduler.config import SchedulerConfig
from scheduler.errors import NoCapacityError, SchedulerConnectionError
from scheduler.keys import KeySchema
from scheduler.messages import Finished, SubmitRequest, TokenChunk
from scheduler.sim_node import SimBehavior, sim_token
from splitwise.engine.sampling_params import SamplingParams
from splitwise.testing.redis_cluster import RedisClusterServers
from splitwise.testing.redis_sentinel import SERVICE, SentinelSet

_topics = itertools.count()


@pytest.fixture()
def cluster_config(redis_cluster: RedisClusterServers) -> SchedulerConfig:
    return SchedulerConfig(
        scheduler_host=redis_cluster.seed.host,
        scheduler_port=redis_cluster.seed.port,
        scheduler_cluster=True,
        scheduler_topic=f"c{next(_topics)}",
        heartbeat_interval_s=0.1,
        block_ms=100,
        scheduler_ttl_s=30.0,
    )


@pytest.fixture()
def sentinels() -> Iterator[SentinelSet]:
    deployment = SentinelSet().start()
    try:
        yield deployment
    finally:
        deployment.stop()


def _tokens(msgs: list) -> list[int]:
    return [t for m in msgs if isinstance(m, TokenChunk) for t in m.token_ids]


def test_topic_keys_share_one_cluster_slot() -> None:
    from redis.crc import key_slot

    keys = KeySchema("prod")
    made = [keys.nodes, keys.alive, keys.bookings, keys.candidates("g", "p"), keys.work("d0"), keys.log]
    assert len({key_slot(k.encode()) for k in made}) == 1


def test_pd_dispatch_cancel_and_redispatch_through_a_redis_cluster(cluster_config: SchedulerConfig) -> None:
    async def body() -> None:
        async with cluster(cluster_config) as c:
            await c.add_node("p0", "prefill")
            await c.add_node("d0", "decode")
            await c.add_node("d1", "decode", behavior=SimBehavior(token_delay_s=0.02))  # max_tokens applies
            fe = await c.add_frontend()
            prompts = {f"r{i}": [i + 1, 5] for i in range(12)}
            streams = {
                rid: await fe.submit(
                    SubmitRequest(
                        req_id=rid, prompt_token_ids=p, sampling_params=SamplingParams(max_tokens=6)
                    )
                )
                for rid, p in prompts.items()
            }
            for rid, stream in streams.items():
                msgs = await stream.collect()
                assert isinstance(msgs[-1], Finished), msgs[-1]
                assert _tokens(msgs) == [sim_token(prompts[rid], i) for i in range(6)]
            # a node that leaves mid-request: its work is re-dispatched and resumes
            await c.nodes["d0"].agent.close()
            slow = await fe.submit(
                SubmitRequest(
                    req_id="slow", prompt_token_ids=[3], sampling_params=SamplingParams(max_tokens=30)
                )
            )
            first = await slow.__anext__()
            assert isinstance(first, TokenChunk)
            assert await fe.cancel("slow")
            assert (await slow.collect())[-1].TYPE == "cancelled"
            assert await eventually(lambda: booked(fe), {}, timeout_s=30) == {}
            assert fe.stats.get("illegal_transitions") == 0

    run(body(), timeout_s=60)


NUM_TOKENS = 60


def test_sentinel_failover_under_load(sentinels: SentinelSet) -> None:
    """Kill the master while requests stream: each in-flight request ends with its full result or an
    explicit error, and new requests are served within a few seconds of the failover."""
    config = SchedulerConfig(
        scheduler_sentinel=sentinels.addresses,
        scheduler_sentinel_service=SERVICE,
        scheduler_topic="s",
        heartbeat_interval_s=0.2,
        dead_after_missed=5,
        block_ms=100,
        scheduler_ttl_s=60.0,
    )

    async def body() -> None:
        async with cluster(config) as c:
            await c.add_node("p0", "prefill")
            for i in range(2):
                await c.add_node(
                    f"d{i}", "decode", behavior=SimBehavior(num_tokens=NUM_TOKENS, token_delay_s=0.05)
                )
            fe = await c.add_frontend()
            prompts = {f"r{i}": [i + 1, 9] for i in range(8)}
            streams = {
                rid: await fe.submit(SubmitRequest(req_id=rid, prompt_token_ids=p, ttl_s=60.0))
                for rid, p in prompts.items()
            }
            # Mid-stream: every request has delivered its first token (none can be done: the rest
            # takes NUM_TOKENS x 50 ms), then the master dies.
            firsts = {rid: await asyncio.wait_for(s.__anext__(), 30) for rid, s in streams.items()}
            old_master = sentinels.master_port()
            assert sentinels.master is not None
            sentinels.master.kill()
            killed_at = time.monotonic()
            # New requests are tried from the kill on, while the in-flight ones finish or fail.
            probe = asyncio.create_task(_first_served(fe, deadline_s=30.0))
            outcomes = await asyncio.gather(*(s.collect() for s in streams.values()))
            for (rid, first), rest in zip(firsts.items(), outcomes, strict=True):
                msgs = [first, *rest]
                assert msgs[-1].is_terminal and sum(m.is_terminal for m in msgs) == 1, rid
                if isinstance(msgs[-1], Finished):
                    assert _tokens(msgs) == [sim_token(prompts[rid], i) for i in range(NUM_TOKENS)], rid
            finished = sum(isinstance(m[-1], Finished) for m in outcomes)
            await _promoted(sentinels, old_master, deadline_s=30.0)
            served_at = await probe
            print(
                f"failover: {finished}/8 in-flight finished; new request served {served_at - killed_at:.1f} s after the kill"
            )
            assert served_at - killed_at < 20.0

    run(body(), timeout_s=120)


async def _promoted(sentinels: SentinelSet, old_master: int, *, deadline_s: float) -> None:
    """Poll the sentinels until they name a new master."""
    end = time.monotonic() + deadline_s
    while sentinels.master_port() == old_master:
        if time.monotonic() > end:
            raise AssertionError(f"no replica promoted within {deadline_s} s")
        await asyncio.sleep(0.2)


async def _first_served(fe, *, deadline_s: float) -> float:  # type: ignore[no-untyped-def]
    """Submit short requests until one finishes; returns when (monotonic)."""
    end = time.monotonic() + deadline_s
    for i in itertools.count():
        try:
            msgs = await (
                await fe.submit(
                    SubmitRequest(
                        req_id=f"after{i}",
                        prompt_token_ids=[1],
                        sampling_params=SamplingParams(max_tokens=2),
                        ttl_s=5.0,
                    )
                )
            ).collect()
            if isinstance(msgs[-1], Finished):
                return time.monotonic()
        except (NoCapacityError, SchedulerConnectionError):
            pass
        if time.monotonic() > end:
            raise AssertionError("no request served after the failover")
        await asyncio.sleep(0.2)
    raise AssertionError("unreachable")
