"""After a run, every key under the topic belongs to the key schema and has a TTL (SCAN + PTTL)."""

from __future__ import annotations

import dataclasses

from scheduler_support import cluster, eventually, run

from scheduler.config import SchedulerConfig
from scheduler.keys import OWNED_WITHOUT_TTL, KeySchema
from scheduler.messages import Finished, SubmitRequest
from scheduler.sim_node import SimBehavior


async def _audit(client, keys: KeySchema) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """{key: problem} for keys outside the schema or without a TTL."""
    problems: dict[str, str] = {}
    async for raw in client.scan_iter(match=keys.all_pattern(), count=500):
        key = raw.decode()
        kind = keys.classify(key)
        if kind is None:
            problems[key] = "not in the key schema"
        elif kind not in OWNED_WITHOUT_TTL and await client.pttl(key) < 0:
            problems[key] = "no TTL"
    return problems


def test_every_key_has_a_ttl_and_is_in_the_schema(config: SchedulerConfig) -> None:
    config = dataclasses.replace(config, max_redispatch=1)

    async def body() -> None:
        async with cluster(config) as c:
            await c.add_node("p0", "prefill")
            await c.add_node("d0", "decode")
            await c.add_node("m0", "mixed")
            fe = await c.add_frontend()
            for i in range(20):
                msgs = await (
                    await fe.submit(SubmitRequest(req_id=f"r{i}", prompt_token_ids=[1, i]))
                ).collect()
                assert isinstance(msgs[-1], Finished)
            stream = await fe.submit(SubmitRequest(req_id="x", prompt_token_ids=[1], ttl_s=0.2))
            await fe.cancel("x")
            await stream.collect()
            await fe._client.xadd(fe.keys.work("d0"), {"m": b"poison"})  # -> dead letters
            gone = await c.add_node("gone", "decode", serve=False, behavior=SimBehavior())
            await gone.agent.close()  # a departed node leaves only keys that expire
            keys = fe.keys
            client = fe._client
            seen = {keys.classify(k.decode()) async for k in client.scan_iter(match=keys.all_pattern())}
            await fe.flush_records()
            expected = {"nodes", "hb", "work", "ctl", "results", "alive", "frontends", "epoch", "cand"}
            assert expected | {"bookings", "log", "dead"} <= seen, seen
            assert await _audit(client, keys) == {}
            other = c.frontends[0]
            await other.close()  # a closed frontend deletes its own keys
            from scheduler.connection import make_client

            probe = make_client(config)
            try:
                assert await probe.exists(keys.results(other.frontend_id)) == 0
                assert await probe.zscore(keys.frontends, other.frontend_id) is None
                assert await _audit(probe, keys) == {}
            finally:
                await probe.aclose()

    run(body())


def test_crashed_node_is_reaped_from_the_registry_after_a_ttl(config: SchedulerConfig, sim_processes) -> None:  # type: ignore[no-untyped-def]
    config = dataclasses.replace(config, scheduler_ttl_s=1.0)
    proc = sim_processes("m-crash", "mixed")

    async def body() -> None:
        async with cluster(config) as c:
            fe = await c.add_frontend()
            assert await fe._client.hexists(fe.keys.nodes, "m-crash")
            proc.kill()  # no deregistration: only its heartbeat stops
            await eventually(lambda: fe._client.hexists(fe.keys.nodes, "m-crash"), False)
            assert fe.stats.get("nodes_reaped") == 1

    run(body())
