"""Maps sequences onto the block pool: block tables, prefix-cache hits, reservations.

Token ``t`` of a sequence lives in block ``seq.block_table[t // block_size]`` at slot
``t % block_size``. Only FULL blocks are ever cached; block ``i``'s hash chains the hash of
block ``i-1`` with its own tokens, so equal hashes mean equal whole prefixes.

Who calls what (the scheduler, except where noted)::

    admission      match_prefix -> can_allocate(seq, n, prefix) -> allocate(seq, n, prefix)
    each step      can_allocate(seq, n) -> allocate(seq, n) ... after the step: mark_computed(seq)
    finish/preempt free(seq)
    disaggregated  engine: can_reserve/reserve(req_id, n) ... KV written by a transport ...
                   adopt(seq) (the sequence takes the blocks) or release(req_id)
"""

from __future__ import annotations

from dataclasses import dataclass

from splitwise.engine.block_pool import BlockHash, BlockPool, hash_block
from splitwise.engine.errors import InvalidRequestError, OutOfBlocksError, UnknownRequestError
from splitwise.engine.sequence import Sequence


@dataclass(frozen=True)
class PrefixMatch:
    """Cached full blocks covering the first ``num_tokens`` tokens of a sequence.

    A lookup result only: no references are taken until ``allocate`` is given it.
    """

    block_ids: tuple[int, ...] = ()
    block_hashes: tuple[BlockHash, ...] = ()
    num_tokens: int = 0

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


NO_MATCH = PrefixMatch()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"--block-size: {block_size} must be >= 1")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._pool = BlockPool(num_blocks)
        # req_id -> hashes of the sequence's leading full, computed blocks (a hash chain).
        self._seq_hashes: dict[str, list[BlockHash]] = {}
        # req_id -> blocks reserved for KV that a transport writes from outside.
        self._reservations: dict[str, list[int]] = {}

    # -- accounting ---------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self._pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks available to a fresh allocation (including evictable cached blocks)."""
        return self._pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self._pool.num_used_blocks

    @property
    def num_cached_blocks(self) -> int:
        return self._pool.num_cached_blocks

    @property
    def num_reserved_blocks(self) -> int:
        return sum(len(blocks) for blocks in self._reservations.values())

    @property
    def num_referenced_blocks(self) -> int:
        """Blocks with a nonzero refcount. Zero once every sequence and reservation is gone."""
        return len(self._pool.referenced_block_ids())

    @property
    def usage(self) -> float:
        return self._pool.usage

    def referenced_block_ids(self) -> list[int]:
        return self._pool.referenced_block_ids()

    def take_cache_changes(
        self, *, full: bool = False
    ) -> tuple[list[tuple[BlockHash, bool]], list[BlockHash] | None]:
        """The prefix cache's changes for the Redis prefix index (``BlockPool.take_changes``)."""
        return self._pool.take_changes(full=full)

    def ref_count(self, block_id: int) -> int:
        return self._pool.ref_count(block_id)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- sequences ----------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> PrefixMatch:
        """Longest run of cached full blocks at the start of ``seq.token_ids``.

        Never covers the last token: a step must compute at least one token to get logits.
        Sequences that already hold blocks get no match.
        """
        if seq.block_table:
            return NO_MATCH
        return self.cached_prefix(seq.token_ids)

    def cached_prefix(self, token_ids: list[int]) -> PrefixMatch:
        """``match_prefix`` for a prompt that has no sequence yet (a lookup: nothing is referenced).
        Never covers the last token, so a request always has at least one block to compute."""
        if not self.enable_prefix_caching:
            return NO_MATCH
        max_blocks = (len(token_ids) - 1) // self.block_size
        block_ids: list[int] = []
        hashes: list[BlockHash] = []
        for i in range(max_blocks):
            block_hash = hash_block(hashes[-1] if hashes else None, self._block_tokens(token_ids, i))
            block_id = self._pool.lookup(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
            hashes.append(block_hash)
        return PrefixMatch(tuple(block_ids), tuple(hashes), len(block_ids) * self.block_size)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, prefix: PrefixMatch = NO_MATCH) -> bool:
        """Whether ``allocate(seq, num_new_tokens, prefix)`` would succeed now."""
        if prefix.num_blocks:
            # Hit blocks nobody references are counted as free, but taking them removes them.
            num_available = self.num_free_blocks - sum(
                1 for b in prefix.block_ids if self._pool.ref_count(b) == 0
            )
            num_needed = self.num_blocks_for(prefix.num_tokens + num_new_tokens) - prefix.num_blocks
        else:
            num_available = self.num_free_blocks
            num_needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return num_needed <= num_available

    def allocate(self, seq: Sequence, num_new_tokens: int, prefix: PrefixMatch = NO_MATCH) -> None:
        """Give ``seq`` blocks for its first ``num_computed_tokens + num_new_tokens`` tokens.

        With a ``prefix`` (admission only) the hit blocks are referenced first and the sequence's
        ``num_computed_tokens`` and ``num_cached_tokens`` jump to ``prefix.num_tokens``.
        Raises OutOfBlocksError (and changes nothing) if the pool is short.
        """
        if prefix.num_blocks and (seq.block_table or seq.num_computed_tokens):
            raise ValueError(f"{seq.req_id}: a prefix match applies only to a sequence without KV")
        num_computed_tokens = prefix.num_tokens if prefix.num_blocks else seq.num_computed_tokens
        if num_new_tokens < 0 or num_computed_tokens + num_new_tokens > seq.num_tokens:
            raise ValueError(
                f"{seq.req_id}: {num_new_tokens} new tokens do not fit a {seq.num_tokens}-token sequence"
            )
        if not self.can_allocate(seq, num_new_tokens, prefix):
            raise OutOfBlocksError(f"no KV blocks for {num_new_tokens} new tokens", req_id=seq.req_id)
        if not seq.block_table:
            seq.num_cached_tokens = 0
        if prefix.num_blocks:
            for block_id in prefix.block_ids:
                self._pool.touch(block_id)
            seq.block_table.extend(prefix.block_ids)
            seq.num_computed_tokens = seq.num_cached_tokens = prefix.num_tokens
            self._seq_hashes[seq.req_id] = list(prefix.block_hashes)
        num_needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if num_needed > 0:
            seq.block_table.extend(self._pool.allocate(num_needed))

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references. Cached blocks stay findable until evicted."""
        # Tail first: the evictable list is LRU, so a prefix's later blocks go before its head,
        # which more requests share.
        self._pool.free(reversed(seq.block_table))
        seq.block_table.clear()
        self._seq_hashes.pop(seq.req_id, None)

    def mark_computed(self, seq: Sequence) -> None:
        """Register every full block whose KV is now computed in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes.setdefault(seq.req_id, [])
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= len(hashes):
            return
        token_ids = seq.token_ids
        for i in range(len(hashes), num_full):
            block_hash = hash_block(hashes[-1] if hashes else None, self._block_tokens(token_ids, i))
            hashes.append(block_hash)
            block_id = seq.block_table[i]
            if self._pool.block_hash(block_id) is None:
                self._pool.cache(block_id, block_hash)

    def _block_tokens(self, token_ids: list[int], index: int) -> list[int]:
        return token_ids[index * self.block_size : (index + 1) * self.block_size]

    # -- reservations (KV written from outside) -----------------------------------------------

    def can_reserve(self, num_tokens: int) -> bool:
        return self.num_blocks_for(num_tokens) <= self.num_free_blocks

    def reserve(self, req_id: str, num_tokens: int, prefix: PrefixMatch = NO_MATCH) -> list[int]:
        """Reserve blocks for ``num_tokens`` tokens of KV that a transport will write.

        The blocks are referenced (never evicted) and not cached until a sequence adopts them.
        With a ``prefix`` (``cached_prefix`` of the prompt: decode-side reuse) the reservation
        starts with those cached blocks, referenced too, so only the rest is written from outside::

            reservation  [ prefix block 0 .. k-1 (cached, shared) | fresh block k .. n-1 ]
        """
        if num_tokens < 1:
            raise InvalidRequestError(f"cannot reserve KV for {num_tokens} tokens", req_id=req_id)
        if req_id in self._reservations:
            raise InvalidRequestError(f"KV reservation {req_id!r} already exists", req_id=req_id)
        if prefix.num_tokens > num_tokens:
            raise ValueError(f"{req_id}: a {prefix.num_tokens}-token prefix exceeds {num_tokens} tokens")
        num_needed = self.num_blocks_for(num_tokens) - prefix.num_blocks
        # Hit blocks nobody references count as free, but taking them removes them (as can_allocate).
        num_available = self.num_free_blocks - sum(
            1 for b in prefix.block_ids if self._pool.ref_count(b) == 0
        )
        if num_needed > num_available:
            raise OutOfBlocksError(
                f"need {num_needed} KV blocks for {num_tokens} tokens, {num_available} free",
                req_id=req_id,
            )
        for block_id in prefix.block_ids:
            self._pool.touch(block_id)
        block_ids = [*prefix.block_ids, *self._pool.allocate(num_needed)]
        self._reservations[req_id] = block_ids
        return list(block_ids)

    def release(self, req_id: str) -> None:
        """Give back a reservation that will not be adopted (transfer failed or cancelled)."""
        block_ids = self._reservations.pop(req_id, None)
        if block_ids is None:
            raise UnknownRequestError("no KV reservation for this request", req_id=req_id)
        self._pool.free(reversed(block_ids))

    def has_reservation(self, req_id: str) -> bool:
        return req_id in self._reservations

    def adopt(self, seq: Sequence, reservation_id: str | None = None) -> None:
        """Hand the reservation made under ``reservation_id`` (default ``seq.req_id``) to ``seq``
        as its block table.

        ``seq.num_computed_tokens`` must already count the KV that was written into it.
        """
        key = seq.req_id if reservation_id is None else reservation_id
        block_ids = self._reservations.get(key)
        if block_ids is None:
            raise UnknownRequestError(f"no KV reservation {key!r}", req_id=seq.req_id)
        if seq.block_table:
            raise InvalidRequestError("sequence already holds KV blocks", req_id=seq.req_id)
        if self.num_blocks_for(seq.num_computed_tokens) > len(block_ids):
            raise InvalidRequestError(
                f"{seq.num_computed_tokens} computed tokens do not fit the {len(block_ids)} reserved blocks",
                req_id=seq.req_id,
            )
        del self._reservations[key]
        seq.block_table.extend(block_ids)
        seq.num_cached_tokens = 0
