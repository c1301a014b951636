"""The prefix index in Redis: which prompt blocks each node's KV cache holds (KV-aware routing).

Node side (``PrefixIndexPublisher``): each prefill/decode node mirrors its prefix cache into one
SET ``{t}:pfx:<node>`` of block hashes, the engine's own chained hashes (``hash_block``) cut to 64
bits as 16 hex digits. It sends only what changed since the last publish (blocks cached, blocks
evicted), every 100 ms when something changed, and a full snapshot at start, after a Redis error, and when
more changed than the cache holds. Every publish refreshes the key's TTL; a node that dies leaves a
set that expires, and dispatch never scores a node whose lease lapsed anyway.

Frontend side (``prompt_block_hashes``): the first ``MAX_PREFIX_BLOCKS`` block hashes of a prompt,
computed exactly as the nodes' caches compute them, go to the dispatch script, which finds each
sampled candidate's cached prefix with one SMISMEMBER of those hashes per candidate: the cost per
dispatch depends on the sample size and n, never on how many blocks the cluster caches.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from scheduler.keys import KeySchema
from scheduler.registry import CandidateGroup
from splitwise.engine.block_pool import hash_block

# Hashes per dispatch: prefixes longer than this many blocks score as this many (bounded cost).
MAX_PREFIX_BLOCKS = 64
_CHUNK = 1000  # members per SADD/SREM command


def short_hash(block_hash: int) -> str:
    """A block hash as the index stores it: the low 64 bits, 16 hex digits."""
    return f"{block_hash & 0xFFFFFFFFFFFFFFFF:016x}"


def prompt_block_hashes(
    token_ids: Sequence[int], block_size: int, max_blocks: int = MAX_PREFIX_BLOCKS
) -> list[str]:
    """The index hashes of the prompt's leading full blocks, as a node's prefix cache would hold
    them (never the block of the last token: a cache never covers it, ``cached_prefix``)."""
    num_blocks = min(max_blocks, (len(token_ids) - 1) // block_size)
    out: list[str] = []
    parent: int | None = None
    for i in range(num_blocks):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        out.append(short_hash(parent))
    return out


class PrefixIndexPublisher:
    """Writes one node's prefix-cache changes to its index SET (one pipeline per publish)."""

    def __init__(self, client: aioredis.Redis, keys: KeySchema, node_id: str, *, ttl_ms: int) -> None:
        self._client = client
        self._key = keys.prefix_index(node_id)
        self._ttl_ms = ttl_ms

    @property
    def key(self) -> str:
        return self._key

    async def publish(self, changes: list[tuple[int, bool]], snapshot: list[int] | None) -> int:
        """Apply ``changes`` ((hash, cached?) in order), or replace the set by ``snapshot``.
        Returns the number of hashes written. Raises redis errors (the caller then snapshots)."""
        pipe = self._client.pipeline(transaction=snapshot is not None)
        written = 0
        if snapshot is not None:
            pipe.delete(self._key)
            members = [short_hash(h) for h in snapshot]
            for i in range(0, len(members), _CHUNK):
                pipe.sadd(self._key, *members[i : i + _CHUNK])
            written = len(members)
        else:
            final: dict[str, bool] = {}
            for block_hash, cached in changes:  # the last change of a hash wins
                final[short_hash(block_hash)] = cached
            added = [h for h, cached in final.items() if cached]
            removed = [h for h, cached in final.items() if not cached]
            for i in range(0, len(added), _CHUNK):
                pipe.sadd(self._key, *added[i : i + _CHUNK])
            for i in range(0, len(removed), _CHUNK):
                pipe.srem(self._key, *removed[i : i + _CHUNK])
            written = len(final)
        pipe.pexpire(self._key, self._ttl_ms)
        await pipe.execute()
        return written

    async def clear(self) -> None:
        await self._client.delete(self._key)


def group_prefix_hashes(token_ids: Sequence[int], group: CandidateGroup) -> tuple[int, list[str]]:
    """(block size, the prompt's leading block hashes) for KV-aware scoring in ``group`` (sent
    with weights 0 too: the record then shows what load-only routing found cached)."""
    block_size = next(iter(group.nodes.values())).kv.block_size if group.nodes else 0
    if block_size < 1:
        return 0, []
    return block_size, prompt_block_hashes(token_ids, block_size)
