"""Dispatch against a real redis-server: XpYd from several frontends, mixed-only, balance, compatibility."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter

import pytest
from scheduler_support import (
    booked,
    booked_decode,
    booked_prefill,
    cluster,
    dispatched_pair,
    eventually,
    request_events,
    run,
)

from scheduler.config import SchedulerConfig
from scheduler.errors import NoCapacityError
from scheduler.messages import Finished, KVGeometry, SubmitRequest, TokenChunk
from scheduler.sim_node import SimBehavior, sim_token
from splitwise.codes import Protocol
from splitwise.engine.sampling_params import SamplingParams


def _tokens(msgs: list) -> list[int]:
    return [t for m in msgs if isinstance(m, TokenChunk) for t in m.token_ids]


def test_xpyd_from_several_frontends(config: SchedulerConfig) -> None:
    async def body() -> None:
        async with cluster(config) as c:
            for i in range(2):
                await c.add_node(f"p{i}", "prefill")
            for i in range(3):
                await c.add_node(f"d{i}", "decode")
            fes = [await c.add_frontend() for _ in range(3)]
            streams = []
            for i in range(30):
                prompt = [i + 1] * (5 + i)
                streams.append(
                    (
                        prompt,
                        await fes[i % 3].submit(
                            SubmitRequest(
                                req_id=f"r{i}",
                                prompt_token_ids=prompt,
                                sampling_params=SamplingParams(max_tokens=5),
                            )
                        ),
                    )
                )
            for prompt, stream in streams:
                msgs = await stream.collect()
                assert isinstance(msgs[-1], Finished), msgs[-1]
                assert sum(1 for m in msgs if m.is_terminal) == 1
                assert _tokens(msgs) == [sim_token(prompt, i) for i in range(5)]
            served = {nid: sum(sim.served.values()) for nid, sim in c.nodes.items()}
            assert served["p0"] == served["p1"] == 0  # D-first: work goes to decode nodes only
            assert sum(served[f"d{i}"] for i in range(3)) == 30
            assert all(served[f"d{i}"] >= 5 for i in range(3)), served
            # every booking was released once the requests finished
            assert await eventually(lambda: booked(fes[0]), {}) == {}

    run(body())


def test_mixed_only_cluster(config: SchedulerConfig) -> None:
    async def body() -> None:
        async with cluster(config) as c:
            await c.add_node("m0", "mixed")
            await c.add_node("m1", "mixed")
            fe = await c.add_frontend()
            streams = [
                await fe.submit(
                    SubmitRequest(
                        req_id=f"r{i}",
                        prompt_token_ids=[1, 2, 3],
                        sampling_params=SamplingParams(max_tokens=4),
                    )
                )
                for i in range(10)
            ]
            for stream in streams:
                msgs = await stream.collect()
                assert isinstance(msgs[-1], Finished)
                assert len(_tokens(msgs)) == 4
            assert sum(c.nodes["m0"].served.values()) + sum(c.nodes["m1"].served.values()) == 10
            assert sum(c.nodes["m0"].served.values()) >= 3

    run(body())


def test_no_capacity_without_a_pair(config: SchedulerConfig) -> None:
    async def body() -> None:
        async with cluster(config) as c:
            fe = await c.add_frontend()
            with pytest.raises(NoCapacityError):
                await fe.submit(SubmitRequest(req_id="r0", prompt_token_ids=[1]))
            await c.add_node("p0", "prefill")  # a prefill node alone is not a pair
            with pytest.raises(NoCapacityError):
                await fe.submit(SubmitRequest(req_id="r1", prompt_token_ids=[1]))
            await c.add_node("d0", "decode")
            msgs = await (await fe.submit(SubmitRequest(req_id="r2", prompt_token_ids=[1]))).collect()
            assert isinstance(msgs[-1], Finished)

    run(body())


def test_pair_without_a_common_protocol_is_withdrawn_and_released(config: SchedulerConfig) -> None:
    """The script enqueued before the frontend saw the pair shares no protocol: the frontend takes
    the entry back and releases the bookings; a node that read it first drops it (no protocol)."""

    async def body() -> None:
        async with cluster(config) as c:
            await c.add_node("p0", "prefill", host="10.0.0.1", protocols=["rdma"], serve=False)
            d0 = await c.add_node("d0", "decode", host="10.0.0.2", protocols=["tcp"], serve=False)
            fe = await c.add_frontend()
            with pytest.raises(NoCapacityError, match="share no transfer protocol"):
                await fe.submit(SubmitRequest(req_id="r0", prompt_token_ids=[1] * 20))
            assert await fe.client.xlen(fe.keys.work("d0")) == 0
            assert booked_decode(await booked(fe)) == {} and booked_prefill(await booked(fe)) == {}
            assert "r0" not in fe.inflight and not d0.agent.holds("r0")

    run(body())


def test_mismatched_model_or_geometry_never_paired(config: SchedulerConfig) -> None:
    other_kv = KVGeometry(dtype="float16", block_size=16, num_layers=2, num_kv_heads=2, head_dim=64)

    async def body() -> None:
        async with cluster(config) as c:
            await c.add_node("p-a", "prefill")
            await c.add_node("d-b", "decode", kv=other_kv)
            await c.add_node("d-other-model", "decode", model_id="other-model")
            fe = await c.add_frontend()
            with pytest.raises(NoCapacityError):
                await fe.submit(SubmitRequest(req_id="r0", prompt_token_ids=[1]))
            await c.add_node("p-b", "prefill", kv=other_kv)
            await c.add_node("d-a", "decode")
            for i in range(12):
                msgs = await (
                    await fe.submit(SubmitRequest(req_id=f"r{i + 1}", prompt_token_ids=[1]))
                ).collect()
                assert isinstance(msgs[-1], Finished)
            await fe.flush_records()
            events = await request_events(fe, "r1")
            pairs = Counter()
            for i in range(12):
                pairs[dispatched_pair(await request_events(fe, f"r{i + 1}"))] += 1
            assert set(pairs) <= {("p-a", "d-a"), ("p-b", "d-b")}, pairs
            assert events, "lifecycle events recorded"
            assert sum(c.nodes["d-other-model"].served.values()) == 0

    run(body())


def test_balanced_load_under_skewed_sizes(config: SchedulerConfig) -> None:
    """Bookings are visible at once: with nobody consuming, one 1000-token prompt on one prefill
    node is balanced by ten 100-token prompts on the other, and decode requests spread evenly."""

    async def body() -> None:
        async with cluster(config) as c:
            await c.add_node("p0", "prefill")
            await c.add_node("p1", "prefill")
            await c.add_node("d0", "decode", serve=False)
            await c.add_node("d1", "decode", serve=False)
            fes = [await c.add_frontend() for _ in range(2)]
            sizes = [1000] + [100] * 10 + [1000] + [100] * 10
            for i, n in enumerate(sizes):  # alternating frontends: each sees the other's bookings
                await fes[i % 2].submit(SubmitRequest(req_id=f"r{i}", prompt_token_ids=[7] * n))
            load = await booked(fes[0])
            assert booked_prefill(load) == {"p0": 2000, "p1": 2000}
            assert booked_decode(load) == {"d0": 11, "d1": 11}

    run(body())


def test_concurrent_frontends_stay_balanced(config: SchedulerConfig) -> None:
    """Concurrent submits from 4 frontends: greedy on atomically booked load keeps the prefill
    imbalance within one largest request (a herd onto one node would be far worse)."""

    async def body() -> None:
        async with cluster(config) as c:
            for i in range(3):
                await c.add_node(f"p{i}", "prefill")
            await c.add_node("d0", "decode", serve=False)
            fes = [await c.add_frontend() for _ in range(4)]
            sizes = [1000 if i % 7 == 0 else 50 + (i * 37) % 200 for i in range(60)]
            await asyncio.gather(
                *(
                    fes[i % 4].submit(SubmitRequest(req_id=f"r{i}", prompt_token_ids=[3] * n))
                    for i, n in enumerate(sizes)
                )
            )
            loads = list(booked_prefill(await booked(fes[0])).values())
            assert sum(loads) == sum(sizes) and len(loads) == 3
            assert max(loads) - min(loads) <= max(sizes), loads

    run(body())


def test_transfer_protocol_choice(config: SchedulerConfig) -> None:
    async def body() -> None:
        async with cluster(config) as c:
            await c.add_node("p0", "prefill", host="10.0.0.1", serve=False)
            d0 = await c.add_node("d0", "decode", host="10.0.0.2", serve=False)
            fe = await c.add_frontend()
            await fe.submit(SubmitRequest(req_id="r0", prompt_token_ids=[1]))
            work = await d0.agent.next_work()
            assert work.assignment.mode == "disagg"
            assert work.assignment.protocol == "rdma"  # different hosts: no ipc
            assert work.assignment.prefill_endpoint.host == "10.0.0.1"
            assert work.assignment.decode_endpoint.host == "10.0.0.2"
            assert work.assignment.decode_endpoint.protocol is Protocol.RDMA
            assert work.assignment.decode_incarnation == d0.agent.info.incarnation

    run(body())


def test_one_script_call_books_and_enqueues_the_same_assignment_both_sides(config: SchedulerConfig) -> None:
    """The dispatch script enqueues the work entry itself (no second round trip): the decode node
    builds the Assignment from the entry's pick and descriptions, equal to the frontend's."""

    async def body() -> None:
        async with cluster(config) as c:
            await c.add_node("p0", "prefill", host="10.0.0.1", serve=False)
            d0 = await c.add_node("d0", "decode", host="10.0.0.2", serve=False)
            m0 = await c.add_node("m0", "mixed", model_id="other", serve=False)
            fe = await c.add_frontend()
            xadds = int((await fe.client.info("commandstats"))["cmdstat_xadd"]["calls"])
            await fe.submit(SubmitRequest(req_id="r0", prompt_token_ids=[1] * 40))
            assert int((await fe.client.info("commandstats"))["cmdstat_xadd"]["calls"]) == xadds + 1
            ((_id, entry),) = await fe.client.xrange(fe.keys.work("d0"), "-", "+")
            assert entry[b"mode"] == b"disagg" and entry[b"g"] == fe.inflight["r0"].assignment.group.encode()
            work = await d0.agent.next_work()
            assert work.assignment == fe.inflight["r0"].assignment
            assert work.assignment.mode == "disagg" and work.assignment.prefill_host == "10.0.0.1"
            assert len(work.assignment.bookings) == 2 and work.prompt_token_ids == [1] * 40
            fe_mixed = await c.add_frontend(model_id="other")
            await fe_mixed.submit(SubmitRequest(req_id="r1", prompt_token_ids=[2]))
            mixed = await m0.agent.next_work()
            assert mixed.assignment == fe_mixed.inflight["r1"].assignment
            assert mixed.assignment.mode == "mixed" and mixed.assignment.bookings[0].startswith("m|")

    run(body())


def test_node_takes_every_queued_item_in_order(config: SchedulerConfig) -> None:
    """Work read in one batch is handed out one item at a time, none skipped."""

    async def body() -> None:
        async with cluster(config) as c:
            m0 = await c.add_node("m0", "mixed", serve=False)
            fe = await c.add_frontend()
            for i in range(20):
                await fe.submit(SubmitRequest(req_id=f"r{i}", prompt_token_ids=[1]))
            got = [(await m0.agent.next_work()).req_id for _ in range(20)]
            assert got == [f"r{i}" for i in range(20)]
            assert all(m0.agent.holds(f"r{i}") for i in range(20))

    run(body())


@pytest.mark.parametrize("num_nodes", [2, 64])
def test_commands_per_request_stay_flat_and_under_twenty(config: SchedulerConfig, num_nodes: int) -> None:
    """Every command Redis executes (INFO commandstats, script internals included) per 1-token P/D
    request, one in flight: at most 20, and the same with 64 nodes as with 2 (slow heartbeats keep
    the background out of the count)."""
    config = dataclasses.replace(config, heartbeat_interval_s=5.0, block_ms=1000)

    async def calls(client) -> int:  # type: ignore[no-untyped-def]
        stats = await client.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_"))

    async def body() -> None:
        async with cluster(config) as c:
            for i in range(num_nodes):
                role = "prefill" if i % 2 == 0 else "decode"
                await c.add_node(f"{role[0]}{i}", role, behavior=SimBehavior(num_tokens=1))
            fe = await c.add_frontend()
            for i in range(10):  # warm-up: scripts loaded, view complete
                await (await fe.submit(SubmitRequest(req_id=f"w{i}", prompt_token_ids=[1] * 8))).collect()
            before = await calls(fe._client)
            n = 40
            for i in range(n):
                msgs = await (
                    await fe.submit(SubmitRequest(req_id=f"r{i}", prompt_token_ids=[1] * 8))
                ).collect()
                assert isinstance(msgs[-1], Finished)
            per_request = (await calls(fe._client) - before - 1) / n
            assert per_request <= 20, per_request

    run(body(), timeout_s=60)


def test_entry_decoder_builds_the_assignment_or_refuses_a_pair_without_protocol() -> None:
    from scheduler.dispatch import UNASSIGNED, EntryDecoder, build_assignment
    from scheduler.errors import MessageDecodeError
    from scheduler.messages import WorkItem, encode
    from scheduler.sim_node import make_node_info

    p = dataclasses.replace(make_node_info("p0", "prefill", host="10.0.0.1"), incarnation="a")
    d = dataclasses.replace(make_node_info("d0", "decode", host="10.0.0.2"), incarnation="b")
    item = WorkItem("r0", [1, 2], SamplingParams(), "fe", 1, 2, 0, [], UNASSIGNED)
    bookings = ["p|g|p0|a|r0|0|2", "d|g|d0|b|r0|0|1048576"]
    entry = {
        b"m": encode(item),
        b"mode": b"disagg",
        b"p": b"p0|a",
        b"d": b"d0|b",
        b"g": b"g",
        b"b": " ".join(bookings).encode(),
        b"pi": encode(p),
        b"di": encode(d),
    }
    decoder = EntryDecoder()
    got = decoder.work_item(entry)
    assert got.assignment == build_assignment("r0", "g", ("disagg", "p0|a", "d0|b"), bookings, p, d)
    assert got.assignment.protocol == "rdma" and got.req_id == "r0"
    assert decoder.work_item({b"m": encode(dataclasses.replace(item, assignment=got.assignment))}) == got
    tcp_only = dataclasses.replace(d, transfer_protocols=[Protocol.TCP])
    rdma_only = dataclasses.replace(p, transfer_protocols=[Protocol.RDMA])
    with pytest.raises(NoCapacityError):
        decoder.work_item({**entry, b"pi": encode(rdma_only), b"di": encode(tcp_only)})
    with pytest.raises(MessageDecodeError):
        decoder.work_item({k: v for k, v in entry.items() if k != b"pi"})
