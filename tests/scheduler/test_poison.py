"""Poison in Redis (issue #13, item 4): keys of the wrong type, deleted streams and non-numeric values
written by someone else. The cluster keeps serving, each poisoned key is dead-lettered with its
reason (shown by ``splitwise inspect``), and no loop is left failing on it."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from scheduler_support import cluster, eventually, run

from scheduler.config import SchedulerConfig
from scheduler.keys import ROLE_LETTERS, KeySchema, group_id
from scheduler.messages import Finished, LoadReport, SubmitRequest
from scheduler.poison import parse_int
from scheduler.sim_node import DEFAULT_KV
from splitwise.commands.inspect import collect

Poison = Callable[[Any, KeySchema, str], Awaitable[object]]


async def _replace_with_string(r: Any, key: str) -> None:
    pipe = r.pipeline(transaction=True)
    pipe.delete(key)
    pipe.set(key, "poison")
    await pipe.execute()


def _cand(keys: KeySchema) -> str:
    return keys.candidates(group_id("sim-model", DEFAULT_KV.compat_key), ROLE_LETTERS["mixed"])


# name -> (how to poison (client, keys, frontend id), dead-letter source expected, or None for none)
WRONG_TYPE: dict[str, tuple[Poison, str]] = {
    "heartbeat hash": (lambda r, k, fe: _replace_with_string(r, k.heartbeat("m0")), "key:hb"),
    "work stream": (lambda r, k, fe: _replace_with_string(r, k.work("m0")), "key:work"),
    "control stream": (lambda r, k, fe: _replace_with_string(r, k.control("m0")), "key:ctl"),
    "bookings zset": (lambda r, k, fe: _replace_with_string(r, k.bookings), "key:bookings"),
    "lease zset": (lambda r, k, fe: _replace_with_string(r, k.alive), "key:alive"),
    "node descriptions": (lambda r, k, fe: _replace_with_string(r, k.nodes), "key:nodes"),
    "candidate set": (lambda r, k, fe: _replace_with_string(r, _cand(k)), "key:cand"),
    "results stream": (lambda r, k, fe: _replace_with_string(r, k.results(fe)), "key:results"),
    "frontend leases": (lambda r, k, fe: _replace_with_string(r, k.frontends), "key:frontends"),
}


async def _serve_requests(fe: Any, prefix: str, count: int) -> None:
    for i in range(count):
        stream = await fe.submit(
            SubmitRequest(req_id=f"{prefix}{i}", prompt_token_ids=[1, 2], sampling_params={"max_tokens": 3})
        )
        msgs = await stream.collect()
        assert isinstance(msgs[-1], Finished), (prefix, i, msgs[-1])


@pytest.mark.parametrize("case", sorted(WRONG_TYPE))
def test_key_of_the_wrong_type_is_dead_lettered_and_the_cluster_keeps_serving(
    config: SchedulerConfig, case: str
) -> None:
    poison, source = WRONG_TYPE[case]

    async def body() -> None:
        async with cluster(config) as c:
            node = await c.add_node("m0", "mixed")
            beats = itertools.count()
            # as a real instance's load does, the report changes: beats write the heartbeat hash
            node.agent._load_provider = lambda: LoadReport(free_kv_blocks=next(beats))
            fe = await c.add_frontend()
            r = fe.client
            await _serve_requests(fe, "before", 2)
            await poison(r, fe.keys, fe.frontend_id)
            # Requests across several heartbeats: every beat, read and dispatch meets the poison,
            # and a frontend that starts now reads the registry afresh (once a repair deleted the node
            # descriptions, the nodes re-register within a heartbeat: wait for that, then serve).
            await _serve_requests(fe, "after", 6)
            fe2 = await c.add_frontend()

            async def sources() -> bool:
                entries = await r.xrange(fe.keys.dead_letters)
                return any(e[b"source"].decode() == source for _id, e in entries)

            assert await eventually(sources, True), case
            report = await collect(config, req_id=None, dead_letter_limit=50)
            reasons = [d["reason"] for d in report["dead_letters"]["recent"] if d["source"] == source]
            assert reasons and "wrong type string" in reasons[0], reasons
            repaired = sum(s.get("wrong_type_keys") for s in (node.agent.stats, fe.stats, fe2.stats))
            assert repaired >= 1

            async def m0_alive() -> bool:
                rows = (await collect(config, req_id=None, dead_letter_limit=1))["nodes"]
                return any(row["node_id"] == "m0" and row["alive"] for row in rows)

            assert await eventually(m0_alive, True), "m0 re-registered and is shown alive"
            await _serve_requests(fe, "later", 2)
            await _serve_requests(fe2, "fe2-", 2)

    run(body(), timeout_s=60)


def test_non_numeric_values_are_ignored_and_inspect_shows_them(config: SchedulerConfig) -> None:
    """A heartbeat ``ts_ms = "abc"``, non-numeric load fields and a booking with a non-numeric
    amount: inspect reports them instead of crashing, dispatch and release ignore them."""

    async def body() -> None:
        async with cluster(config) as c:
            await c.add_node("m0", "mixed")
            fe = await c.add_frontend()
            r = fe.client
            await r.hset(fe.keys.heartbeat("m0"), mapping={"ts_ms": "abc", "running_requests": "many"})
            poison_booking = f"m|{group_id('sim-model', DEFAULT_KV.compat_key)}|m0|x|poison|0|abc"
            await r.zadd(fe.keys.bookings, {poison_booking: fe.server_clock.now_ms() + 60_000})
            report = await collect(config, req_id=None, dead_letter_limit=5)
            (row,) = [n for n in report["nodes"] if n["node_id"] == "m0"]
            assert any("ts_ms 'abc'" in p for p in row["problems"]), row
            assert row["load"]["running_requests"] == 0 and row["heartbeat_age_s"] is None
            await _serve_requests(fe, "r", 4)
            # the poison booking is never released into the load (RELEASE skips it) nor counted
            assert await r.zscore(fe.keys.bookings, poison_booking) is not None

    run(body(), timeout_s=60)


def test_deleted_work_stream_is_recreated_and_requests_flow(config: SchedulerConfig) -> None:
    async def body() -> None:
        async with cluster(config) as c:
            node = await c.add_node("m0", "mixed")
            fe = await c.add_frontend()
            r = fe.client
            await _serve_requests(fe, "before", 1)
            await r.delete(fe.keys.work("m0"))
            await _serve_requests(fe, "after", 4)
            # the dispatch script re-created it and said so: what it held before is re-dispatched
            assert fe.stats.get("work_stream_missing") == 1 and "m0" in fe.lost_work_streams
            # the node's own heartbeat also notices and re-creates it when nobody dispatches
            await r.delete(fe.keys.work("m0"))
            assert await eventually(lambda: r.exists(fe.keys.work("m0")), 1) == 1
            assert node.agent.stats.get("node_reader_errors") == 0

    run(body(), timeout_s=60)


def test_parse_int_treats_garbage_as_missing() -> None:
    assert parse_int(b"12") == 12 and parse_int("3.0") == 3
    assert parse_int("abc") == 0 and parse_int(b"\xff", -1) == -1 and parse_int("inf", 7) == 7
    assert parse_int(None, 5) == 5


def test_queued_items_of_a_deleted_work_stream_are_redispatched(config: SchedulerConfig) -> None:
    """A work item still queued (its node has not read it) when the node's work stream is deleted:
    the node's heartbeat re-creates the stream before anyone dispatches there again, so no XADD
    notices the loss. The frontend's monitor finds the item gone on two looks and re-dispatches it
    at once (logged, counted as work_items_lost), instead of the request waiting for its TTL; the
    lost attempt never runs, the new one is served once."""
    from scheduler.messages import WorkItem, decode

    async def body() -> None:
        async with cluster(config) as c:
            sim = await c.add_node("m0", "mixed")
            fe = await c.add_frontend()
            r = fe.client
            work = fe.keys.work("m0")
            await _serve_requests(fe, "before", 1)
            agent: Any = sim.agent
            agent._tasks[0].cancel()  # the node's reader is wedged: what is queued stays in Redis
            stream = await fe.submit(
                SubmitRequest(req_id="queued", prompt_token_ids=[1, 2], sampling_params={"max_tokens": 3})
            )
            fl = fe.inflight["queued"]
            first_attempt, entry_id = fl.attempt, fl.entry_id
            assert entry_id is not None and await r.xrange(work, entry_id, entry_id)
            await r.delete(work)
            assert await eventually(lambda: r.exists(work), 1) == 1  # the node's heartbeat re-created it
            assert (
                await eventually(async_value(lambda: fe.stats.get("work_items_lost")), 1, timeout_s=20) == 1
            )
            assert fl.attempt == first_attempt + 1
            [(_, fields)] = [e for e in await r.xrange(work) if b"m" in e[1]]
            assert decode(fields[b"m"], WorkItem).attempt == fl.attempt  # queued again, as the new attempt
            assert any(
                event == "redispatched" and "work item gone" in detail for _, event, _, detail in fl.events
            )
            # The node reads again: the new attempt is served, once.
            agent._tasks[0] = asyncio.create_task(
                agent._retrier.loop("node_reader", agent._read_once, running=agent._running)
            )
            msgs = await stream.collect()
            assert isinstance(msgs[-1], Finished) and msgs[-1].completion_tokens == 3
            assert sim.served["queued"] == 1

    run(body(), timeout_s=60)


def async_value(get: Callable[[], Any]) -> Callable[[], Awaitable[Any]]:
    async def check() -> Any:
        return get()

    return check
