"""A fixed-shape decode step: inputs padded to batch and context buckets in preallocated buffers,
so on CUDA one step is a captured CUDA graph replayed per (batch bucket, context bucket).

When it runs (``StaticDecodeStep.can_run``): every chunk is a decode chunk (one new token), no
layer callback (a Python callback cannot run inside a graph) and at most ``max(BATCH_BUCKETS)``
chunks. Anything else takes the ordinary dynamic path.

Padding (batch bucket Bk >= B, context bucket nblk >= blocks needed, J = nblk * block_size)::

    buffer          real rows 0..B-1                     padding rows B..Bk-1
    input_ids       each chunk's new token               row 0's token
    positions       num_computed_tokens                  row 0's position
    slot_mapping    its cache slot                       row 0's slot
    kv_write_rows   its slot's K/V row per kv head       row 0's rows
    block_ids       its table, padded with block 0       row 0's table
    kv_rows         the table's rows per kv head         row 0's rows
    attn_mask       0 for keys j <= position, else -inf  row 0's mask

A padding row is an exact copy of row 0, so its K/V write to row 0's slot stores the same bytes
row 0 stores (the duplicate index_copy_ is harmless) and no block outside the batch's own is
touched. Padding rows' logits are dropped. The mask is additive float (masked SDPA; on CUDA the
memory-efficient kernel takes it).

On CPU graphs are never captured: the same padded step runs eagerly, which is what the tests check
against the dynamic path (so the CUDA path differs only by capture/replay).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from typing import Any

import torch

from splitwise.engine.kv_cache import KVCache
from splitwise.engine.model.attention_metadata import (
    AttentionMetadata,
    DecodeBatch,
    kv_rows,
    kv_write_rows,
)
from splitwise.engine.model.llama import CausalLM

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket_of(n: int, buckets: SequenceOf[int]) -> int:
    """The smallest bucket >= n (n must not exceed the largest)."""
    return next(b for b in buckets if b >= n)


def blocks_bucket(num_blocks: int) -> int:
    """Context buckets in blocks: powers of two, so a growing context recaptures log2 times."""
    return 1 << max(0, (num_blocks - 1).bit_length())


@dataclass(frozen=True)
class DecodeInput:
    """One decode chunk, as plain ints: its new token, position (= context before it) and table."""

    token_id: int
    position: int
    block_table: SequenceOf[int]


class _Bucket:
    """Preallocated buffers (and, on CUDA, the captured graph) of one (Bk, nblk) shape."""

    def __init__(
        self,
        batch: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.batch, self.num_blocks, self.block_size = batch, num_blocks, block_size
        self.num_kv_heads = num_kv_heads
        self.input_ids = torch.zeros(batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(batch, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(batch, dtype=torch.int64, device=device)
        self.kv_write_rows = torch.zeros(batch, num_kv_heads, dtype=torch.int64, device=device)
        self.block_ids = torch.zeros(batch * num_blocks, dtype=torch.int64, device=device)
        self.kv_rows = torch.zeros(batch * num_kv_heads * num_blocks, dtype=torch.int64, device=device)
        self.attn_mask = torch.zeros(batch, 1, 1, num_blocks * block_size, dtype=dtype, device=device)
        self.logits_indices = torch.arange(batch, dtype=torch.int64, device=device)
        self.meta = AttentionMetadata(
            positions=self.positions,
            slot_mapping=self.slot_mapping,
            kv_write_rows=self.kv_write_rows,
            decode=DecodeBatch(
                token_rows=tuple(range(batch)),
                first_row=0,
                token_index=self.logits_indices,
                block_ids=self.block_ids,
                kv_rows=self.kv_rows,
                num_blocks=num_blocks,
                num_keys=num_blocks * block_size,
                attn_mask=self.attn_mask,
            ),
            prefills=(),
            num_tokens=batch,
        )
        self.graph: Any = None
        self.logits: torch.Tensor | None = None

    def fill(self, inputs: SequenceOf[DecodeInput]) -> None:
        """Host-side staging, then one copy per buffer (pinned on CUDA: non-blocking)."""
        bs, nblk = self.block_size, self.num_blocks
        rows = list(inputs) + [inputs[0]] * (self.batch - len(inputs))
        table = [list(r.block_table[:nblk]) + [0] * (nblk - len(r.block_table[:nblk])) for r in rows]
        positions = torch.tensor([r.position for r in rows], dtype=torch.int64)
        slots = [table[i][r.position // bs] * bs + r.position % bs for i, r in enumerate(rows)]
        key_pos = torch.arange(nblk * bs, dtype=torch.int64)[None, :]
        mask = torch.zeros(self.batch, nblk * bs, dtype=self.attn_mask.dtype)
        mask.masked_fill_(key_pos > positions[:, None], float("-inf"))
        pin = self.input_ids.device.type == "cuda"
        slot_mapping = torch.tensor(slots, dtype=torch.int64)
        block_ids = torch.tensor(table, dtype=torch.int64)
        staged = (
            (self.input_ids, torch.tensor([r.token_id for r in rows], dtype=torch.int64)),
            (self.positions, positions),
            (self.slot_mapping, slot_mapping),
            (self.kv_write_rows, kv_write_rows(slot_mapping, bs, self.num_kv_heads)),
            (self.block_ids, block_ids.view(-1)),
            (self.kv_rows, kv_rows(block_ids, self.num_kv_heads)),
            (self.attn_mask, mask.view(self.attn_mask.shape)),
        )
        for dst, src in staged:
            dst.copy_(src.pin_memory() if pin else src, non_blocking=pin)


class StaticDecodeStep:
    """Runs all-decode steps with fixed shapes. ``use_graphs`` only on CUDA (captured lazily, one
    graph per bucket, after a warm-up run on a side stream as CUDA graph capture requires)."""

    def __init__(self, model: CausalLM, kv_cache: KVCache, block_size: int, *, use_graphs: bool) -> None:
        self.model, self.kv_cache, self.block_size = model, kv_cache, block_size
        self.device = kv_cache.device
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.dtype = next(model.parameters()).dtype
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._pool: Any = None

    @staticmethod
    def can_run(num_new_tokens: SequenceOf[int], has_callback: bool, sliding_window: int | None) -> bool:
        return (
            not has_callback
            and sliding_window is None  # windowed masks are built by the dynamic path only
            and 0 < len(num_new_tokens) <= BATCH_BUCKETS[-1]
            and all(n == 1 for n in num_new_tokens)
        )

    def run(self, inputs: SequenceOf[DecodeInput]) -> torch.Tensor:
        """float32 logits [len(inputs), vocab]."""
        needed = max(-(-(r.position + 1) // self.block_size) for r in inputs)
        key = (bucket_of(len(inputs), BATCH_BUCKETS), blocks_bucket(needed))
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(
                *key, self.block_size, self.kv_cache.geometry.num_kv_heads, self.device, self.dtype
            )
        bucket.fill(inputs)
        with torch.inference_mode():
            if not self.use_graphs:
                return self._forward(bucket)[: len(inputs)]
            if bucket.graph is None:
                self._capture(bucket)
            bucket.graph.replay()
            assert bucket.logits is not None
            return bucket.logits[: len(inputs)].clone()

    def _forward(self, bucket: _Bucket) -> torch.Tensor:
        forward: Callable[..., torch.Tensor] = self.model
        return forward(bucket.input_ids, bucket.meta, self.kv_cache, bucket.logits_indices, None)

    def _capture(self, bucket: _Bucket) -> None:
        # The warm-up writes the same K/V bytes the replay will write (the buffers are already
        # filled with this step's inputs), so running it is harmless.
        side = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(bucket)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            bucket.logits = self._forward(bucket)
        self._pool = graph.pool()
        bucket.graph = graph
