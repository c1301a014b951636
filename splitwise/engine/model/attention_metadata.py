"""Where a step's tokens live in the paged KV cache and what each may attend to. Built once per
step on the host, from plain ints; every layer reuses it, so the layer loop never syncs.

A step computes a flat run of new tokens, chunk after chunk (chunk b = sequence b's new tokens).
Chunk b starts at absolute position ``start_b`` (its ``num_computed_tokens``) and has ``n_b``
tokens; it attends to positions [0, start_b + n_b) of its own sequence.

Index arithmetic (bs = block_size, table_b = chunk b's block table)::

    what                        index                                   into
    new token i of chunk b      t = n_0 + ... + n_{b-1} + i             flat q/k/v [T, H, D]
      its position              p = start_b + i
      its cache slot            table_b[p // bs] * bs + p % bs          (slot_mapping)
      its K/V row, kv head h    (slot // bs) * Hc * bs + (h0 + h) * bs  cache.view(-1, D)
                                + slot % bs                             (kv_write_rows [T, Hkv])
    key j of chunk b, head h    gathered[h, j] = cache[table_b[j // bs], h0 + h, j % bs]
      (so key j IS position j)  row table_b[n] * Hc + h0 + h of         cache.view(-1, bs, D)
                                (kv_rows, ordered (b, h, n))
      visible to token i iff    j <= start_b + i  (and j > p - window with a sliding window)

Hkv is the number of kv heads the step computes, Hc the number each cache block holds and h0 the
first of the step's heads in a block: Hc = Hkv, h0 = 0, except on a tensor-parallel rank on CPU,
whose cache is the instance's shared buffer of every head and whose heads are the slice
[h0, h0 + Hkv) of each block (``engine.parallel.kv_view``).

The cache is head-major inside a block ([num_blocks, Hkv, bs, D] per layer, see ``kv_cache``), so
one ``index_select`` of rows [bs, D] in (chunk, head, block) order yields K as [G, Hkv, J, D],
contiguous per head: attention multiplies it directly (no transpose copy, no mask for the tail).

How each kind of chunk is attended (one call each; chosen by measurement, see below)::

    kind                 keys read from                          mask
    decode (n = 1), all  cache rows, one index_select per        none if every chunk sees all J =
      in one batch       layer over ``kv_rows`` [G * Hkv * nblk] nblk * bs keys, else [G,1,1,J] bool
    fresh prefill        the chunk's own new k/v (no cache read) is_causal (a bool mask only with
      (start 0)                                                  a sliding window shorter than n)
    continued prefill    its cache blocks, index_select          [1,1,n,ctx] bool
      (start > 0: chunked or prefix-cached)

Why: on this project's CPU (1 thread, batch 8 / context 512, one layer's decode attention, best
of 7): ``index_select`` of whole token-major blocks + SDPA 1.28 ms in bf16 (SDPA's CPU kernel is
5x slower in bf16, so the blocks were cast to fp32 first) and 1.71 ms in fp32; head-major rows +
two ``bmm`` 0.58 ms in bf16 and 1.31 ms in fp32 (batch 32: 7.6 -> 2.9 ms; context 2048, batch 8:
7.3 -> 3.0 ms). The earlier token-major ``cache[tables]`` + mask was 1.16 ms in fp32. The gather
itself is cheap (0.1 ms of the 0.58: the rows sit in cache-sized 2 KiB runs). New K/V are written
to the cache before the gather, so a decode or continued chunk sees its own tokens exactly as it
sees prefix-cached tokens or blocks another process wrote: only through the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class GatherBuffers:
    """Destinations of the K/V block gathers, owned by the runner and reused by every layer of
    every step (grown on demand, never shrunk): a gather then writes into memory that is already
    mapped and cached instead of allocating 2 x blocks x block bytes per layer."""

    def __init__(self) -> None:
        self._kv: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(
        self, rows: torch.Tensor, num_rows: int, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two [num_rows, *rows.shape[1:]] buffers shaped like the cache's ``rows``, in ``dtype``
        (default the cache's; a second pair holds half-precision rows converted for math)."""
        dtype = dtype or rows.dtype
        pair = self._kv.get(dtype)
        if pair is None or pair[0].shape[0] < num_rows or pair[0].shape[1:] != rows.shape[1:]:
            capacity = max(num_rows, 2 * pair[0].shape[0] if pair is not None else 0)
            shape = (capacity, *rows.shape[1:])
            pair = (
                torch.empty(shape, dtype=dtype, device=rows.device),
                torch.empty(shape, dtype=dtype, device=rows.device),
            )
            self._kv[dtype] = pair
        return pair[0][:num_rows], pair[1][:num_rows]


@dataclass(frozen=True)
class DecodeBatch:
    """All decode chunks of a step, attended in one SDPA call with G queries of one token."""

    token_rows: tuple[int, ...]  # flat token row of each chunk's query, in chunk order
    first_row: int | None  # rows are first_row .. first_row + G - 1 (q/out are narrowed views)
    token_index: torch.Tensor  # [G] int64: token_rows, for the non-contiguous case
    block_ids: torch.Tensor  # [G * num_blocks] int64: chunk g's table, padded with block 0
    kv_rows: torch.Tensor  # [G * Hkv * num_blocks] int64: block_ids[g, n] * Hc + h0 + h, (g, h, n) order
    num_blocks: int  # blocks per chunk after padding
    num_keys: int  # J = num_blocks * block_size: keys gathered per chunk
    attn_mask: torch.Tensor | None  # [G, 1, 1, J] bool (True = may attend); None = all visible
    masked_out: torch.Tensor | None = None  # ~attn_mask, built on the host (the CPU kernel's fill)
    # [G * Hkv, 1, J] additive (0 visible, -inf not) in the CPU decode matmul dtype, when the step
    # was built with ``bias_dtype``: the scores' matmul adds it (one baddbmm, no fill per layer)
    attn_bias: torch.Tensor | None = None

    @property
    def num_chunks(self) -> int:
        return len(self.token_rows)


@dataclass(frozen=True)
class PrefillChunk:
    """One chunk of more than one token, attended on its own."""

    first_row: int
    num_tokens: int
    block_ids: torch.Tensor | None  # [num_blocks] int64; None: fresh prefill, keys = its own k/v
    kv_rows: torch.Tensor | None  # [Hkv * num_blocks] int64: block_ids[n] * Hc + h0 + h, (h, n) order
    num_keys: int  # start + num_tokens
    attn_mask: torch.Tensor | None  # [1, 1, n, num_keys] bool; None: plain causal


@dataclass(frozen=True)
class AttentionMetadata:
    """Per step: positions and cache slots of the new tokens, and how to attend."""

    positions: torch.Tensor  # [T] int64: absolute position of each new token
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * bs + offset) of each new token
    kv_write_rows: torch.Tensor  # [T, Hkv] int64: K/V row of each new token's kv heads
    decode: DecodeBatch | None
    prefills: tuple[PrefillChunk, ...]
    num_tokens: int
    buffers: GatherBuffers | None = None  # None: gathers allocate (one-off callers, tests)

    @staticmethod
    def build(
        starts: Sequence[int],
        num_new_tokens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str,
        *,
        num_kv_heads: int,
        first_kv_head: int = 0,
        cache_kv_heads: int | None = None,
        sliding_window: int | None = None,
        buffers: GatherBuffers | None = None,
        bias_dtype: torch.dtype | None = None,
    ) -> AttentionMetadata:
        """``block_tables[b]`` must cover positions [0, starts[b] + num_new_tokens[b]).

        The step's ``num_kv_heads`` heads are [first_kv_head, + num_kv_heads) of the
        ``cache_kv_heads`` (default ``num_kv_heads``) in each cache block. ``bias_dtype``: also
        build the decode batch's additive ``attn_bias`` in that dtype (the CPU decode kernel's)."""
        heads = _Heads(num_kv_heads, first_kv_head, cache_kv_heads or num_kv_heads)
        if heads.first + heads.count > heads.per_block:
            raise ValueError(f"kv heads [{heads.first}, +{heads.count}) outside a block's {heads.per_block}")
        positions: list[int] = []
        slots: list[int] = []
        first_rows: list[int] = []
        for start, count, table in zip(starts, num_new_tokens, block_tables, strict=True):
            first_rows.append(len(positions))
            for pos in range(start, start + count):
                positions.append(pos)
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        decode_members = [b for b, n in enumerate(num_new_tokens) if n == 1]
        decode = None
        if decode_members:
            decode = _decode_batch(
                [first_rows[b] for b in decode_members],
                [starts[b] for b in decode_members],
                [block_tables[b] for b in decode_members],
                block_size,
                heads,
                device,
                sliding_window,
                bias_dtype,
            )
        prefills = tuple(
            _prefill_chunk(
                first_rows[b], starts[b], n, block_tables[b], block_size, heads, device, sliding_window
            )
            for b, n in enumerate(num_new_tokens)
            if n > 1
        )
        slot_mapping = torch.tensor(slots, dtype=torch.int64)
        return AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.int64).to(device),
            slot_mapping=slot_mapping.to(device),
            kv_write_rows=heads.write_rows(slot_mapping, block_size).to(device),
            decode=decode,
            prefills=prefills,
            num_tokens=len(positions),
            buffers=buffers,
        )


@dataclass(frozen=True)
class _Heads:
    """The step's kv heads in a cache block: ``count`` of them from ``first``, of ``per_block``."""

    count: int
    first: int
    per_block: int

    def write_rows(self, slots: torch.Tensor, block_size: int) -> torch.Tensor:
        return kv_write_rows(slots, block_size, self.count, first_head=self.first, cache_heads=self.per_block)

    def rows(self, block_ids: torch.Tensor) -> torch.Tensor:
        return kv_rows(block_ids, self.count, first_head=self.first, cache_heads=self.per_block)


def kv_write_rows(
    slots: torch.Tensor,
    block_size: int,
    num_kv_heads: int,
    *,
    first_head: int = 0,
    cache_heads: int | None = None,
) -> torch.Tensor:
    """[T, Hkv]: the row of cache.view(-1, D) that token t's kv head h is written to (head
    first_head + h of the cache_heads, default num_kv_heads, in a block)."""
    per_block = cache_heads or num_kv_heads
    heads = (torch.arange(num_kv_heads, dtype=torch.int64) + first_head) * block_size
    base = (slots // block_size) * (per_block * block_size) + slots % block_size
    return base[:, None] + heads[None, :]


def kv_rows(
    block_ids: torch.Tensor, num_kv_heads: int, *, first_head: int = 0, cache_heads: int | None = None
) -> torch.Tensor:
    """block_ids [G, nblk] -> [G * Hkv * nblk]: rows of cache.view(-1, bs, D) in (g, h, n) order
    (head first_head + h of the cache_heads, default num_kv_heads, in a block)."""
    per_block = cache_heads or num_kv_heads
    heads = torch.arange(num_kv_heads, dtype=torch.int64) + first_head
    return (block_ids[:, None, :] * per_block + heads[None, :, None]).reshape(-1)


def _visible(query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """key j visible to the query at p iff j <= p (and p - j < window, as HF's sliding window)."""
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    return mask


def _decode_batch(
    rows: list[int],
    starts: list[int],
    tables: list[Sequence[int]],
    block_size: int,
    heads: _Heads,
    device: torch.device | str,
    sliding_window: int | None,
    bias_dtype: torch.dtype | None,
) -> DecodeBatch:
    # Keys are whole blocks (J = num_blocks * bs): the gathered K/V then merge (chunk, head) into
    # one batch dimension as a view; keys past a chunk's position are masked, not narrowed away
    # (a narrowed view made bf16 bmm copy its operand: 2.5 vs 0.4 ms at batch 8 / context 512).
    num_blocks = -(-(max(starts) + 1) // block_size)
    num_keys = num_blocks * block_size
    padded = [list(t[:num_blocks]) + [0] * (num_blocks - len(t[:num_blocks])) for t in tables]
    windowed = sliding_window is not None and num_keys > sliding_window
    mask = None
    if windowed or min(starts) != num_keys - 1:
        query_pos = torch.tensor(starts, dtype=torch.int64)[:, None, None, None]
        key_pos = torch.arange(num_keys, dtype=torch.int64)[None, None, None, :]
        mask = _visible(query_pos, key_pos, sliding_window)
    contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
    block_ids = torch.tensor(padded, dtype=torch.int64)
    bias = None
    if bias_dtype is not None:  # per (chunk, kv head): the rows of the scores' batched matmul
        bias = torch.zeros(len(starts), 1, 1, num_keys)
        if mask is not None:
            bias.masked_fill_(mask.logical_not(), float("-inf"))
        g = len(starts)
        bias = bias.expand(g, heads.count, 1, num_keys).reshape(g * heads.count, 1, num_keys)
        bias = bias.to(device=device, dtype=bias_dtype)
    return DecodeBatch(
        token_rows=tuple(rows),
        first_row=rows[0] if contiguous else None,
        token_index=torch.tensor(rows, dtype=torch.int64).to(device),
        block_ids=block_ids.view(-1).to(device),
        kv_rows=heads.rows(block_ids).to(device),
        num_blocks=num_blocks,
        num_keys=num_keys,
        attn_mask=None if mask is None else mask.to(device),
        masked_out=None if mask is None else mask.logical_not().to(device),
        attn_bias=bias,
    )


def _prefill_chunk(
    first_row: int,
    start: int,
    count: int,
    table: Sequence[int],
    block_size: int,
    heads: _Heads,
    device: torch.device | str,
    sliding_window: int | None,
) -> PrefillChunk:
    num_keys = start + count
    query_pos = torch.arange(start, num_keys, dtype=torch.int64)[None, None, :, None]
    key_pos = torch.arange(num_keys, dtype=torch.int64)[None, None, None, :]
    if start == 0:
        windowed = sliding_window is not None and count > sliding_window
        mask = _visible(query_pos, key_pos, sliding_window).to(device) if windowed else None
        return PrefillChunk(first_row, count, None, None, num_keys, mask)
    block_ids = torch.tensor(list(table[: -(-num_keys // block_size)]), dtype=torch.int64)
    mask = _visible(query_pos, key_pos, sliding_window).to(device)
    rows = heads.rows(block_ids[None])
    return PrefillChunk(first_row, count, block_ids.to(device), rows.to(device), num_keys, mask)
