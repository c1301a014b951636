"""The multiturn workload and its report, as plain data (the clusters are exercised by the bench)."""

from __future__ import annotations

import random

from splitwise.bench.multiturn import MultiturnSpec, Turn, conversation, format_table, ideal_blocks


def test_turns_share_the_whole_previous_prompt_and_answer() -> None:
    spec = MultiturnSpec(model="m", turns=4, user_tokens=10, answer_tokens=6)
    prompts = conversation(random.Random(0), spec)
    assert [len(p) for p in prompts] == [10, 26, 42, 58]
    for prev, cur in zip(prompts, prompts[1:], strict=False):
        assert cur[: len(prev)] == prev  # the previous turn's prompt is a prefix
    assert [ideal_blocks(prompts, t, 4) for t in range(4)] == [0, 2, 6, 10]


def test_report_rates_are_against_the_ideal() -> None:
    turns = [
        Turn("kv", 0, 0, 40, 0, ttft_s=0.2, hashed_blocks=9, kv_blocks=10),
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
        ),
        Turn("load", 1, 4, 80, 9, ttft_s=0.3, hashed_blocks=19, p_cached_blocks=0, kv_blocks=20),
    ]
    table = format_table(turns, block_bytes=1024).splitlines()
    assert table[1].split()[:5] == ["kv", "2", "0.32", "0.32", "1.00"]
    assert table[1].split()[5:7] == ["1.00", "11.0"]  # D reused all it could; 11 blocks of 1 KiB at t>=5
    assert table[2].split()[:5] == ["load", "1", "0.00", "0.47", "0.00"]
