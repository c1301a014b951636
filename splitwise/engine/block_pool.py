"""The pool of KV blocks: refcounts, the free list and the prefix-cache hash map.

A block is in exactly one of three states::

    state        ref_count  block_hash   where
    referenced   >= 1       any          held by sequences / reservations
    evictable    0          set          ``_evictable`` (LRU order) and ``_cached``
    free         0          None         ``_free`` (FIFO order)

A fresh block is taken from ``_free`` first; only when that is empty is the least recently freed
evictable block taken, and its hash forgotten. So cached prefixes survive as long as possible.
The pool knows nothing about sequences; ``BlockManager`` maps sequences onto it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable

from splitwise.engine.errors import OutOfBlocksError

BlockHash = int


def hash_block(parent_hash: BlockHash | None, token_ids: Iterable[int]) -> BlockHash:
    """Chained hash of one full block: sha256(parent hash, tokens), truncated to 128 bits.

    Stable across processes and machines (unlike ``hash()`` of a str), so two instances agree on
    the hashes of the same prefix.
    """
    h = hashlib.sha256()
    h.update(b"root" if parent_hash is None else parent_hash.to_bytes(16, "little"))
    h.update(array("q", token_ids).tobytes())
    return int.from_bytes(h.digest()[:16], "little")


class BlockPool:
    """Fixed pool of ``num_blocks`` block ids ``0 .. num_blocks-1``."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"--num-kv-blocks: {num_blocks} must be >= 1")
        self.num_blocks = num_blocks
        self._ref_counts: list[int] = [0] * num_blocks
        self._hashes: list[BlockHash | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        # block id -> None, oldest-freed first; every entry has ref 0 and a hash.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[BlockHash, int] = {}
        # Prefix-cache changes since the last ``take_changes`` (hash, cached?), for the prefix index
        # in Redis; None until someone tracks them (nothing grows on nodes that do not publish).
        self._changes: list[tuple[BlockHash, bool]] | None = None

    # -- change log (KV-aware routing) --------------------------------------------------------

    def take_changes(
        self, *, full: bool = False
    ) -> tuple[list[tuple[BlockHash, bool]], list[BlockHash] | None]:
        """(changes since the last call, None) -- or, on the first call, with ``full`` and whenever
        the log grew past twice the pool's size, ([], every cached hash): a full snapshot that
        replaces the published set."""
        changes = self._changes
        if full or changes is None or len(changes) > 2 * self.num_blocks:
            self._changes = []
            return [], list(self._cached)
        self._changes = []
        return changes, None

    # -- accounting ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks a fresh allocation may take: never-cached free blocks plus evictable ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, referenced or not."""
        return len(self._cached)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of the pool in use (0.0 .. 1.0)."""
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        return self._hashes[block_id]

    def referenced_block_ids(self) -> list[int]:
        """Ids of every block with a nonzero refcount (leak checks)."""
        return [b for b, ref in enumerate(self._ref_counts) if ref > 0]

    # -- fresh blocks -------------------------------------------------------------------------

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` fresh blocks with refcount 1 and no hash."""
        if num_blocks > self.num_free_blocks:
            raise OutOfBlocksError(f"need {num_blocks} KV blocks, {self.num_free_blocks} free")
        block_ids = [self._take_fresh() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def _take_fresh(self) -> int:
        if self._free:
            return self._free.popleft()
        block_id, _ = self._evictable.popitem(last=False)
        block_hash = self._hashes[block_id]
        assert block_hash is not None and self._cached.get(block_hash) == block_id
        del self._cached[block_hash]
        self._hashes[block_id] = None
        if self._changes is not None:
            self._changes.append((block_hash, False))
        return block_id

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block, in the given order. A block reaching zero goes to
        the evictable list if it is cached (most recently freed last), else to the free list."""
        for block_id in block_ids:
            ref = self._ref_counts[block_id]
            assert ref > 0, f"block {block_id} freed with refcount 0"
            self._ref_counts[block_id] = ref - 1
            if ref == 1:
                if self._hashes[block_id] is None:
                    self._free.append(block_id)
                else:
                    self._evictable[block_id] = None

    # -- prefix cache -------------------------------------------------------------------------

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The cached block with this hash, if any. Does not take a reference."""
        return self._cached.get(block_hash)

    def touch(self, block_id: int) -> None:
        """Take a reference on a cached block found by ``lookup`` (a prefix-cache hit)."""
        if self._ref_counts[block_id] == 0:
            del self._evictable[block_id]
        self._ref_counts[block_id] += 1

    def cache(self, block_id: int, block_hash: BlockHash) -> bool:
        """Register a referenced, fully computed block under ``block_hash``.

        Returns False (and leaves the block uncached) when another block already holds that hash:
        two sequences computed the same prefix at once, and one copy is enough.
        """
        assert self._ref_counts[block_id] > 0 and self._hashes[block_id] is None
        if block_hash in self._cached:
            return False
        self._cached[block_hash] = block_id
        self._hashes[block_id] = block_hash
        if self._changes is not None:
            self._changes.append((block_hash, True))
        return True
