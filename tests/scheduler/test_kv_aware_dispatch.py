"""KV-aware scoring in the dispatch script, against a real redis-server: the prefix index sets are
written as nodes write them (``PrefixIndexPublisher``), and the pick weighs each candidate's cached
prefix against its load (scripts.DISPATCH documents the formula)."""

from __future__ import annotations

import dataclasses

import pytest
from scheduler_support import booked, booked_prefill, cluster, run

from scheduler.config import SchedulerConfig
from scheduler.messages import SubmitRequest
from scheduler.prefix_index import PrefixIndexPublisher, prompt_block_hashes
from splitwise.engine.block_pool import hash_block

BLOCK = 16  # the simulated nodes' block size (scheduler.sim_node.DEFAULT_KV)


def chain(tokens: list[int], num_blocks: int) -> list[int]:
    """The engine's block hashes of the first ``num_blocks`` blocks."""
    out: list[int] = []
    for i in range(num_blocks):
        out.append(hash_block(out[-1] if out else None, tokens[i * BLOCK : (i + 1) * BLOCK]))
    return out


def dispatched(fe, req_id: str) -> str:  # type: ignore[no-untyped-def]
    """The detail of the request's (in flight) ``dispatched`` event."""
    return [e[3] for e in fe.inflight[req_id].events if e[1] == "dispatched"][-1]


def kv_config(config: SchedulerConfig, weight: float = 1.0) -> SchedulerConfig:
    return dataclasses.replace(config, kv_overlap_weight_prefill=weight, kv_overlap_weight_decode=weight)


def test_prompt_hashes_match_the_engine_chain() -> None:
    tokens = list(range(100))
    assert prompt_block_hashes(tokens, BLOCK) == [f"{h & (2**64 - 1):016x}" for h in chain(tokens, 6)]
    assert (
        len(prompt_block_hashes(tokens[:97], BLOCK)) == 6
        and len(prompt_block_hashes(tokens[:96], BLOCK)) == 5
    )
    assert len(prompt_block_hashes(list(range(5000)), BLOCK)) == 64  # bounded per dispatch


def test_the_node_holding_the_prefix_wins_over_a_less_loaded_one(config: SchedulerConfig) -> None:
    prompt = list(range(1, 200))  # 12 full blocks can be cached (the last token's block never is)

    async def body() -> None:
        async with cluster(kv_config(config)) as c:
            for node_id, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode"), ("d1", "decode")):
                await c.add_node(node_id, role, serve=False)
            fe = await c.add_frontend()
            client = fe.client
            p1 = PrefixIndexPublisher(client, fe.keys, "p1", ttl_ms=60_000)
            d1 = PrefixIndexPublisher(client, fe.keys, "d1", ttl_ms=60_000)
            await p1.publish([(h, True) for h in chain(prompt, 10)], None)
            await d1.publish([], chain(prompt, 12))
            # Two warm-ups book each P 100 tokens and each D one request (the second goes to the
            # less-loaded of each): p1's cache saves 10 * 16 = 160 tokens, d1's full prefix one request.
            for req_id in ("warm", "warm2"):
                await fe.submit(SubmitRequest(req_id=req_id, prompt_token_ids=[7] * 100))
            assert booked_prefill(await booked(fe)) == {"p0": 100, "p1": 100}
            await fe.submit(SubmitRequest(req_id="r", prompt_token_ids=prompt))
            detail = dispatched(fe, "r")
            assert "p=p1" in detail, detail
            assert "kv_blocks=10/12/12" in detail, detail
            assert "d=d1" in detail, detail
            # P is booked for what it computes: 199 prompt tokens - 160 cached.
            assert booked_prefill(await booked(fe)) == {"p0": 100, "p1": 100 + 39}
            await fe.cancel("r")  # releases exactly the members the script booked
            assert booked_prefill(await booked(fe)) == {"p0": 100, "p1": 100}

    run(body())


def test_evicted_blocks_leave_the_index_and_load_decides_again(config: SchedulerConfig) -> None:
    prompt = list(range(1, 120))

    async def body() -> None:
        async with cluster(kv_config(config)) as c:
            await c.add_node("p0", "prefill", serve=False)
            await c.add_node("p1", "prefill", serve=False)
            await c.add_node("d0", "decode", serve=False)
            fe = await c.add_frontend()
            pub = PrefixIndexPublisher(fe.client, fe.keys, "p1", ttl_ms=60_000)
            hashes = chain(prompt, 7)
            await pub.publish([(h, True) for h in hashes], None)
            await pub.publish([(h, False) for h in hashes[2:]], None)  # evicted: 2 blocks left
            assert await fe.client.scard(fe.keys.prefix_index("p1")) == 2
            assert 0 < await fe.client.pttl(fe.keys.prefix_index("p1")) <= 60_000
            await fe.submit(SubmitRequest(req_id="warm", prompt_token_ids=[7] * 100))
            [busy] = booked_prefill(await booked(fe))
            await fe.submit(SubmitRequest(req_id="r", prompt_token_ids=prompt))
            detail = dispatched(fe, "r")
            if busy == "p0":  # p1: 0 - 2 * 16 cached against p0's 100: p1, with only 2 blocks now
                assert "p=p1" in detail and "kv_blocks=2/" in detail, detail
            else:  # p1: 100 - 32 = 68 against p0's 0: load decides, the 5 evicted blocks do not count
                assert "p=p0" in detail and "kv_blocks=0/" in detail, detail

    run(body())


def test_weights_zero_is_load_only_but_records_what_was_cached(config: SchedulerConfig) -> None:
    prompt = list(range(1, 120))

    async def body() -> None:
        async with cluster(config) as c:  # weights 0 (the dataclass default)
            await c.add_node("p0", "prefill", serve=False)
            await c.add_node("p1", "prefill", serve=False)
            await c.add_node("d0", "decode", serve=False)
            fe = await c.add_frontend()
            await fe.submit(SubmitRequest(req_id="warm", prompt_token_ids=[7] * 100))
            [busy] = booked_prefill(await booked(fe))
            await PrefixIndexPublisher(fe.client, fe.keys, busy, ttl_ms=60_000).publish([], chain(prompt, 7))
            await fe.submit(SubmitRequest(req_id="r", prompt_token_ids=prompt))
            detail = dispatched(fe, "r")
            assert f"p={busy}" not in detail and "kv_blocks=0/0/7" in detail, detail  # load decided

    run(body())


@pytest.mark.parametrize(
    ("weight", "balance", "winner"),
    [
        (1.0, 2048, "busy"),  # within the bound: the longest prefix wins though its score is worse
        (1.0, 0, "idle"),  # stickiness off: busy 200 - 96 = 104 against idle 0 - 32: the score
        (1.0, 100, "idle"),  # busy is 200 tokens out of balance: only idle is within, and holds 2 blocks
        (0.0, 2048, "idle"),  # load-only routing is never sticky
    ],
)
def test_sticky_prefix_within_a_bounded_imbalance(
    config: SchedulerConfig, weight: float, balance: int, winner: str
) -> None:
    prompt = list(range(1, 200))  # 12 hashable blocks

    async def body() -> None:
        cfg = dataclasses.replace(kv_config(config, weight), kv_prefill_balance_tokens=balance)
        async with cluster(cfg) as c:
            for node_id, role in (("p0", "prefill"), ("p1", "prefill"), ("d0", "decode")):
                await c.add_node(node_id, role, serve=False)
            fe = await c.add_frontend()
            await fe.submit(SubmitRequest(req_id="warm", prompt_token_ids=[7] * 200))
            [busy] = booked_prefill(await booked(fe))
            idle = "p1" if busy == "p0" else "p0"
            await PrefixIndexPublisher(fe.client, fe.keys, busy, ttl_ms=60_000).publish([], chain(prompt, 6))
            await PrefixIndexPublisher(fe.client, fe.keys, idle, ttl_ms=60_000).publish([], chain(prompt, 2))
            await fe.submit(SubmitRequest(req_id="r", prompt_token_ids=prompt))
            detail = dispatched(fe, "r")
            expected = busy if winner == "busy" else idle
            assert f"p={expected}" in detail, detail
            cached = {busy: 6, idle: 2}[expected]
            assert f"kv_blocks={cached}/" in detail, detail  # the index saw what was published
            booked_tokens = 199 - cached * BLOCK if weight else 199  # P books what it computes
            assert booked_prefill(await booked(fe))[expected] == booked_tokens + (
                200 if expected == busy else 0
            )

    run(body())
