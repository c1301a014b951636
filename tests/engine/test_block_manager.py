from __future__ import annotations

import pytest

from splitwise.engine.block_manager import BlockManager
from splitwise.engine.block_pool import BlockPool, hash_block
from splitwise.engine.errors import InvalidRequestError, OutOfBlocksError, UnknownRequestError
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import Sequence


def make_seq(req_id: str, token_ids: list[int]) -> Sequence:
    return Sequence(req_id=req_id, prompt_token_ids=list(token_ids), params=SamplingParams())


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """Allocate and 'compute' every token of ``seq``, then register its full blocks."""
    bm.allocate(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.mark_computed(seq)


def test_allocate_takes_blocks_in_order_and_accounts_exactly() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq("a", list(range(10)))
    assert bm.can_allocate(seq, 10)
    bm.allocate(seq, 10)
    assert seq.block_table == [0, 1, 2]
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.num_referenced_blocks) == (5, 3, 3)
    assert bm.usage == pytest.approx(3 / 8)
    assert bm.referenced_block_ids() == [0, 1, 2]


def test_allocate_grows_one_block_when_decode_crosses_a_boundary() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq("a", [1, 2, 3, 4])
    compute_all(bm, seq)
    seq.output_token_ids.append(5)
    bm.allocate(seq, 1)
    assert seq.block_table == [0, 1]
    seq.num_computed_tokens = 5
    seq.output_token_ids.append(6)
    bm.allocate(seq, 1)  # token 5 fits block 1
    assert seq.block_table == [0, 1]


def test_allocate_short_pool_raises_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq("a", list(range(9)))
    assert not bm.can_allocate(seq, 9)
    with pytest.raises(OutOfBlocksError):
        bm.allocate(seq, 9)
    assert seq.block_table == []
    assert bm.num_free_blocks == 2


def test_allocate_past_the_sequence_is_rejected() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    with pytest.raises(ValueError):
        bm.allocate(make_seq("a", [1, 2]), 3)


def test_free_returns_uncached_blocks_tail_first_to_the_back_of_the_free_list() -> None:
    bm = BlockManager(num_blocks=5, block_size=4, enable_prefix_caching=False)
    a = make_seq("a", list(range(12)))
    bm.allocate(a, 12)
    bm.free(a)
    assert a.block_table == []
    assert bm.num_referenced_blocks == 0 and bm.num_free_blocks == 5
    b = make_seq("b", list(range(20)))
    bm.allocate(b, 20)
    assert b.block_table == [3, 4, 2, 1, 0]


def test_prefix_hit_reuses_the_same_block_ids() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq("a", list(range(10)))
    compute_all(bm, a)
    assert bm.num_cached_blocks == 2  # blocks 0 and 1 are full; block 2 is partial
    b = make_seq("b", list(range(8)) + [50, 51, 52])
    prefix = bm.match_prefix(b)
    assert (prefix.block_ids, prefix.num_tokens) == ((0, 1), 8)
    bm.allocate(b, 3, prefix)
    assert b.block_table == [0, 1, 3]
    assert (b.num_computed_tokens, b.num_cached_tokens) == (8, 8)
    assert (bm.ref_count(0), bm.ref_count(1), bm.ref_count(2), bm.ref_count(3)) == (2, 2, 1, 1)


def test_prefix_match_stops_at_first_differing_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    compute_all(bm, make_seq("a", list(range(12))))
    # Block 1 differs, so block 2 cannot hit either even though its tokens match (chained hash).
    b = make_seq("b", [0, 1, 2, 3, 9, 9, 9, 9, 8, 9, 10, 11, 12])
    assert bm.match_prefix(b).block_ids == (0,)


def test_full_prompt_hit_leaves_the_last_block_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    compute_all(bm, make_seq("a", list(range(8))))
    b = make_seq("b", list(range(8)))
    prefix = bm.match_prefix(b)
    assert (prefix.block_ids, prefix.num_tokens) == ((0,), 4)
    bm.allocate(b, 4, prefix)
    assert b.block_table == [0, 2]
    assert b.num_computed_tokens == 4


def test_cached_blocks_survive_free_and_are_evicted_lru_after_never_cached_ones() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq("a", [1, 2, 3, 4, 5])
    compute_all(bm, a)  # blocks 0,1 cached; 2 partial
    bm.free(a)  # tail first: 2 -> free list; 1 then 0 -> evictable (1 is least recently freed)
    assert (bm.num_free_blocks, bm.num_cached_blocks, bm.num_referenced_blocks) == (4, 2, 0)
    b = make_seq("b", [7, 7, 7, 7, 7, 7])
    bm.allocate(b, 6)
    assert b.block_table == [3, 2, 1]  # never-cached blocks first, then evict block 1
    assert bm.num_cached_blocks == 1
    assert bm.match_prefix(make_seq("c", [1, 2, 3, 4, 5])).block_ids == (0,)


def test_hit_on_an_unreferenced_cached_block_is_not_counted_twice() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a = make_seq("a", [1, 2, 3, 4, 5])
    compute_all(bm, a)
    bm.free(a)
    b = make_seq("b", [1, 2, 3, 4, 9, 9, 9])
    prefix = bm.match_prefix(b)
    assert prefix.block_ids == (0, 1)
    # 3 blocks look free, but 2 of them are the hits themselves: only 1 is left for 2 new ones.
    assert not bm.can_allocate(b, 3, prefix)
    assert bm.can_allocate(b, 1, prefix)
    bm.allocate(b, 1, prefix)
    assert b.block_table == [0, 1, 2]
    assert bm.num_free_blocks == 0


def test_disabled_prefix_caching_never_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_seq("a", list(range(9)))
    compute_all(bm, a)
    assert bm.num_cached_blocks == 0
    assert bm.match_prefix(make_seq("b", list(range(9)))).num_blocks == 0


def test_same_prefix_computed_twice_caches_one_copy_and_frees_the_other() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = make_seq("a", [1, 2, 3]), make_seq("b", [1, 2, 3])
    bm.allocate(a, 3)
    bm.allocate(b, 3)
    for seq in (a, b):
        seq.num_computed_tokens = 3
        bm.mark_computed(seq)
    assert (a.block_table, b.block_table) == ([0, 1], [2, 3])
    assert bm.num_cached_blocks == 1  # block 0; block 2 holds the same tokens but stays uncached
    bm.free(b)
    bm.free(a)
    assert bm.num_referenced_blocks == 0
    c = make_seq("c", [8, 8, 8, 8, 8, 8])
    bm.allocate(c, 6)
    assert c.block_table == [3, 2, 1]  # uncached 3, 2 (b's), 1 (a's); cached block 0 untouched
    assert bm.match_prefix(make_seq("d", [1, 2, 3])).block_ids == (0,)


def test_reserve_release_and_errors() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.reserve("r", 5) == [0, 1]
    assert bm.num_reserved_blocks == 2 and bm.num_referenced_blocks == 2
    with pytest.raises(InvalidRequestError):
        bm.reserve("r", 1)
    with pytest.raises(OutOfBlocksError):
        bm.reserve("s", 9)
    with pytest.raises(InvalidRequestError):
        bm.reserve("s", 0)
    assert not bm.can_reserve(9) and bm.can_reserve(8)
    bm.release("r")
    assert bm.num_referenced_blocks == 0 and bm.num_free_blocks == 4
    with pytest.raises(UnknownRequestError):
        bm.release("r")


def test_adopt_hands_the_reservation_to_the_sequence() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    block_ids = bm.reserve("r", 6)
    seq = make_seq("r", [1, 2, 3, 4, 5, 6])
    seq.num_computed_tokens = 6
    bm.adopt(seq)
    assert seq.block_table == block_ids == [0, 1]
    assert not bm.has_reservation("r")
    with pytest.raises(UnknownRequestError):
        bm.release("r")
    bm.mark_computed(seq)
    assert bm.num_cached_blocks == 1  # the transferred full block is now a prefix-cache entry
    bm.free(seq)
    assert bm.num_referenced_blocks == 0


def test_adopt_rejects_unknown_or_too_small_reservations() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq("r", list(range(6)))
    seq.num_computed_tokens = 6
    with pytest.raises(UnknownRequestError):
        bm.adopt(seq)
    bm.reserve("r", 4)
    with pytest.raises(InvalidRequestError):
        bm.adopt(seq)
    assert bm.has_reservation("r") and seq.block_table == []


def test_hash_block_is_chained_and_deterministic() -> None:
    first = hash_block(None, [1, 2])
    assert first == hash_block(None, [1, 2])
    assert hash_block(first, [3, 4]) != hash_block(None, [3, 4])
    assert hash_block(first, [3, 4]) != hash_block(first, [4, 3])


def test_block_pool_rejects_empty_pool() -> None:
    with pytest.raises(ValueError):
        BlockPool(0)
