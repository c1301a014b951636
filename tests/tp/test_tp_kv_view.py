"""Ranks that each attend over their head slice of one shared, head-major KV buffer write the
bytes and compute the heads a single process holding every head does (no processes: the ranks
are RankKVViews over one KVCache, their attention metadata built as ``parallel.step`` builds it)."""

from __future__ import annotations

import pytest
import torch

from splitwise.engine.kv_cache import KVCache
from splitwise.engine.model.attention import paged_attention
from splitwise.engine.model.attention_metadata import AttentionMetadata
from splitwise.engine.parallel.errors import TensorParallelError
from splitwise.engine.parallel.kv_view import RankKVView
from splitwise.kv_geometry import KVGeometry

BLOCK = 4
HEADS_Q, HEADS_KV, DIM = 8, 4, 16
# Two steps: (a fresh prefill of 6 tokens, one of 2), then (a's decode, b's continued prefill of 3).
STEPS = [
    dict(starts=[0, 0], num_new_tokens=[6, 2], block_tables=[[3, 1], [5]]),
    dict(starts=[6, 2], num_new_tokens=[1, 3], block_tables=[[3, 1], [5, 0]]),
]


def meta_for(step: dict[str, list], heads: range, cache_heads: int) -> AttentionMetadata:
    return AttentionMetadata.build(
        **step,  # type: ignore[arg-type]
        block_size=BLOCK,
        device="cpu",
        num_kv_heads=len(heads),
        first_kv_head=heads.start,
        cache_kv_heads=cache_heads,
    )


def test_a_ranks_rows_are_its_heads_rows_of_the_whole_buffer() -> None:
    full = meta_for(STEPS[1], range(4), 4)
    rank = meta_for(STEPS[1], range(2, 4), 4)
    assert torch.equal(rank.kv_write_rows, full.kv_write_rows[:, 2:])
    assert full.decode is not None and rank.decode is not None
    # (seq, head, block) order: the rank's are heads 2-3 of every sequence
    assert torch.equal(rank.decode.kv_rows, full.decode.kv_rows.view(1, 4, -1)[:, 2:].reshape(-1))
    (prefill,) = rank.prefills
    assert prefill.kv_rows is not None and prefill.kv_rows.tolist() == [5 * 4 + 2, 0 + 2, 5 * 4 + 3, 0 + 3]
    with pytest.raises(ValueError, match="outside a block"):
        meta_for(STEPS[1], range(3, 5), 4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_ranks_over_one_buffer_equal_one_process(dtype: str) -> None:
    geometry = KVGeometry(dtype, BLOCK, 1, HEADS_KV, DIM, num_blocks=8, tp_size=2)
    single, shared = KVCache(geometry), KVCache(geometry)
    ranks = [RankKVView(shared.tensor, geometry, range(r * 2, r * 2 + 2)) for r in range(2)]
    gen = torch.Generator().manual_seed(0)
    torch_dtype = geometry.torch_dtype
    for step in STEPS:
        tokens = sum(step["num_new_tokens"])
        q = torch.randn(tokens, HEADS_Q, DIM, generator=gen).to(torch_dtype)
        k = torch.randn(tokens, HEADS_KV, DIM, generator=gen).to(torch_dtype)
        v = torch.randn(tokens, HEADS_KV, DIM, generator=gen).to(torch_dtype)
        want = paged_attention(q, k, v, single.k(0), single.v(0), meta_for(step, range(HEADS_KV), HEADS_KV))
        parts = []
        for r, rank in enumerate(ranks):
            heads = rank.kv_heads
            assert heads == range(r * 2, r * 2 + 2)
            q_heads = slice(r * HEADS_Q // 2, (r + 1) * HEADS_Q // 2)
            meta = meta_for(step, heads, rank.geometry.num_kv_heads)
            parts.append(
                paged_attention(
                    q[:, q_heads],
                    k[:, heads.start : heads.stop],
                    v[:, heads.start : heads.stop],
                    rank.k(0),
                    rank.v(0),
                    meta,
                )
            )
        assert torch.equal(shared.as_bytes(), single.as_bytes())  # every byte where one process puts it
        assert torch.equal(torch.cat(parts, dim=1), want)  # the same math per head
    for rank in ranks:
        rank.close()


def test_a_view_outside_the_buffer_is_refused() -> None:
    geometry = KVGeometry("float32", BLOCK, 1, 2, DIM, num_blocks=2)
    with pytest.raises(TensorParallelError, match="outside"):
        RankKVView(KVCache(geometry).tensor, geometry, range(1, 3))
