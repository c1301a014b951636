"""KV between buffers holding different numbers of head replicas (tensor parallelism, #14).

An instance's KV buffer holds the model's KV heads once, except when its TP size exceeds them:
then each rank keeps its own replica (engine.parallel.layout). P of TP a -> D of TP b copies
block by block as usual when both hold the same heads; otherwise P reads, for every head of D's
buffer, the source head ``head_map`` names (one ``index_select`` over the head dimension of the
run's blocks) and writes D's layout. D's side is unchanged: it receives its own layout.

Blocks are head-major (``engine.kv_cache``): head h of a block is the contiguous [block_size,
head_dim] slab at byte h * block_size * head_dim * itemsize, so the remap selects over the head
dimension of the layer viewed as [2, blocks, heads, block_size, head_dim], never over ``tensor``'s
own (token-major) shape, whose head index would pick bytes of other heads and slots.

    model KV heads 1:  P tp=2 [h0 h0'] -> D tp=1 [h0]        index [0]
                       P tp=1 [h0]     -> D tp=2 [h0 h0]     index [0, 0]
"""

from __future__ import annotations

import torch

from splitwise.engine.parallel.layout import head_map
from splitwise.kv_geometry import KVGeometry
from splitwise.transfer.base import BlockRun


def remap_index(local: KVGeometry, remote: KVGeometry) -> torch.Tensor | None:
    """Source head of every destination head, or None when the layouts are the same."""
    if not local.needs_head_remap(remote):
        return None
    mapping = head_map(local.logical_kv_heads, local.num_kv_heads, remote.num_kv_heads)
    return torch.tensor(mapping, dtype=torch.int64)


def head_major(layer: torch.Tensor) -> torch.Tensor:
    """One layer of a cache's ``tensor`` [2, blocks, bs, H, D] as its bytes are laid out:
    [2, blocks, H, bs, D] (a view)."""
    kinds, blocks, block_size, heads, head_dim = layer.shape
    return layer.view(kinds, blocks, heads, block_size, head_dim)


def copy_runs_remapped(
    remote: torch.Tensor, local: torch.Tensor, runs: list[BlockRun], index: torch.Tensor
) -> None:
    """Per run, destination head q of blocks d:d+n <- source head index[q] of blocks s:s+n;
    ``remote`` and ``local`` are one layer of each cache's ``tensor`` [2, blocks, bs, H, D]."""
    src, dst = head_major(local), head_major(remote)
    for run in runs:
        heads = src[:, run.src_start : run.src_start + run.num_blocks].index_select(2, index.to(local.device))
        dst[:, run.dst_start : run.dst_start + run.num_blocks].copy_(heads)


def gather_remapped(layer: torch.Tensor, runs: list[list[int]], index: torch.Tensor) -> list[memoryview]:
    """The tcp payload in the destination's layout: K of every run, then V, as byte views of
    fresh contiguous tensors (``layer`` is one layer of ``tensor`` [2, blocks, bs, H, D] on the CPU)."""
    blocks = head_major(layer)
    views = []
    for kind in range(2):
        for start, n in runs:
            rows = blocks[kind, start : start + n].index_select(1, index).contiguous()
            views.append(memoryview(rows.view(torch.uint8).numpy()).cast("B"))  # type: ignore[arg-type]
    return views
