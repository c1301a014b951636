"""The multiturn workload and its report, as plain data (the clusters are exercised by the bench)."""

from __future__ import annotations

import random

import pytest

from splitwise.bench.multiturn import (
    ARMS,
    MultiturnSpec,
    Turn,
    arm_order,
    balance,
    conversation,
    format_rounds,
    format_table,
    ideal_blocks,
    percentile,
    round_groups,
    ttft_ratios,
)


def test_turns_share_the_whole_previous_prompt_and_answer() -> None:
    spec = MultiturnSpec(model="m", turns=4, user_tokens=10, answer_tokens=6)
    prompts = conversation(random.Random(0), spec)
    assert [len(p) for p in prompts] == [10, 26, 42, 58]
    for prev, cur in zip(prompts, prompts[1:], strict=False):
        assert cur[: len(prev)] == prev  # the previous turn's prompt is a prefix
    assert [ideal_blocks(prompts, t, 4) for t in range(4)] == [0, 2, 6, 10]


def test_report_rates_are_against_the_ideal() -> None:
    turns = [
        Turn("kv", 0, 0, 40, 0, ttft_s=0.2, hashed_blocks=9, kv_blocks=10, p_node="p0"),
        Turn(
            "kv",
            0,
            4,
            80,
            9,
            ttft_s=0.1,
            hashed_blocks=19,
            p_cached_blocks=9,
            d_reused_blocks=9,
            kv_blocks=11,
            p_node="p0",
        ),
        Turn("load", 1, 4, 80, 9, ttft_s=0.3, hashed_blocks=19, p_cached_blocks=0, kv_blocks=20, p_node="p1"),
    ]
    table = format_table(turns, block_bytes=1024).splitlines()
    # arm, reqs, P hit, ideal, P/ideal, P moved (turn 4 follows no recorded turn 3: not counted)
    assert table[1].split()[:6] == ["kv", "2", "0.32", "0.32", "1.00", "0"]
    assert table[1].split()[6:8] == ["1.00", "11.0"]  # D reused all it could; 11 blocks of 1 KiB at t>=5
    assert table[2].split()[:5] == ["load", "1", "0.00", "0.47", "0.00"]


def test_moves_balance_and_ttft_ratios_per_round() -> None:
    turns = []
    for round_, (kv_ttft, load_ttft) in enumerate([(0.1, 0.4), (0.3, 0.6)]):
        for t, p_node in enumerate(["p0", "p0", "p1"]):  # the third turn moved to the other P
            turns.append(
                Turn("kv-aware", 0, t, 32, 0, ttft_s=kv_ttft, p_node=p_node, round=round_, p_cached_blocks=1)
            )
            turns.append(Turn("load-only", 0, t, 32, 0, ttft_s=load_ttft, p_node=f"p{t % 2}", round=round_))
    assert ttft_ratios(turns, "kv-aware") == pytest.approx([0.25, 0.5])
    # p0 ran 4 of 6 requests (mean 3) and 4 x (32 - 16) of the 6 x 16 tokens computed (mean 48)
    assert balance([t for t in turns if t.config == "kv-aware"], block_size=16) == pytest.approx(
        (4 / 3, 4 / 3)
    )
    row = format_table(turns, block_bytes=1024).splitlines()[1].split()
    assert row[0] == "kv-aware" and row[5] == "2"  # one move per round
    assert row[-3:] == ["200.0", "300.0", "0.38"]  # p50/p90 of turns 2+, median of the round ratios
    assert "0.25 0.50" in format_rounds(turns)


def test_percentile_and_arm_rotation() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5 and percentile([5.0], 0.9) == 5.0
    assert percentile([], 0.5) == 0.0
    assert arm_order(0) == list(ARMS) and arm_order(1) == [*list(ARMS)[1:], list(ARMS)[0]]


def test_arms_run_apart_or_a_clusters_arms_together() -> None:
    assert round_groups(0, together=False) == [[name] for name in ARMS]
    with_reuse = [n for n in arm_order(1) if ARMS[n][0]]
    without = [n for n in arm_order(1) if not ARMS[n][0]]
    assert round_groups(0, together=True)[0] == [n for n in ARMS if ARMS[n][0]]
    assert round_groups(1, together=True) == [without, with_reuse]  # the clusters' order alternates
