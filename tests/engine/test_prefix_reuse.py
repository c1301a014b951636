"""Decode-side reuse in the block manager: a reservation that starts with the prompt's cached
prefix (exact block ids and reference counts on a tiny pool)."""

from __future__ import annotations

import pytest

from splitwise.engine.block_manager import BlockManager
from splitwise.engine.errors import OutOfBlocksError
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import Sequence


def cached_turn(bm: BlockManager, tokens: list[int]) -> None:
    """A finished request whose every token was computed: its full blocks stay cached, unreferenced."""
    seq = Sequence(req_id="turn1", prompt_token_ids=list(tokens), params=SamplingParams())
    bm.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.mark_computed(seq)
    bm.free(seq)


def test_reservation_starts_with_the_cached_prefix_and_references_it() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    cached_turn(bm, list(range(10)))  # blocks 0, 1 full and cached; block 2 partial (freed)
    prompt = list(range(8)) + [99, 98, 97]  # shares exactly two blocks (a block edge)
    prefix = bm.cached_prefix(prompt)
    assert (prefix.block_ids, prefix.num_tokens) == ((0, 1), 8)
    block_ids = bm.reserve("turn2", len(prompt) + 4, prefix)
    assert block_ids[:2] == [0, 1] and len(block_ids) == 4  # 15 tokens: 2 reused + 2 fresh
    assert [bm.ref_count(b) for b in block_ids] == [1, 1, 1, 1]
    bm.release("turn2")
    assert bm.num_referenced_blocks == 0
    assert bm.cached_prefix(prompt).block_ids == (0, 1)  # still cached after the release


def test_prefix_ending_mid_block_reuses_only_full_blocks_and_never_the_last_token() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    cached_turn(bm, list(range(12)))
    assert bm.cached_prefix(list(range(6)) + [50, 51]).num_tokens == 4  # block 1 differs mid-block
    assert bm.cached_prefix(list(range(12))).num_tokens == 8  # the last token's block is computed


def test_reuse_counts_unreferenced_hit_blocks_as_taken() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    cached_turn(bm, list(range(8)))  # 2 cached blocks, all 4 free (2 of them evictable)
    prefix = bm.cached_prefix(list(range(9)))
    with pytest.raises(OutOfBlocksError):
        bm.reserve("big", 4 * 5, prefix)  # 2 reused + 3 fresh > 4 blocks
    assert bm.num_referenced_blocks == 0 and not bm.has_reservation("big")
    assert bm.reserve("fits", 16, prefix)[:2] == list(prefix.block_ids)


def test_the_pool_logs_cached_and_evicted_hashes_for_the_prefix_index() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    assert bm.take_cache_changes() == ([], [])  # first call: a snapshot (of an empty cache)
    cached_turn(bm, list(range(8)))  # caches 2 blocks
    changes, snapshot = bm.take_cache_changes()
    assert snapshot is None and [cached for _h, cached in changes] == [True, True]
    first, second = (h for h, _c in changes)
    seq = Sequence(req_id="other", prompt_token_ids=[90] * 12, params=SamplingParams())
    bm.allocate(seq, 12)  # needs all 3 blocks: both cached ones are evicted (the LRU first)
    changes, snapshot = bm.take_cache_changes()
    assert snapshot is None and sorted(changes) == sorted([(first, False), (second, False)])
    assert bm.take_cache_changes(full=True) == ([], [])
