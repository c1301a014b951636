"""Attention over the paged KV cache, batched: per layer one gather and one SDPA call per group.

A step computes a flat run of new tokens, chunk after chunk (chunk b = sequence b's new tokens).
Chunk b starts at absolute position ``start_b`` (its ``num_computed_tokens``) and has ``n_b``
tokens; it attends to positions [0, start_b + n_b) of its own sequence.

Index arithmetic (bs = block_size, table_b = chunk b's block table)::

    what                        index                                   into
    new token i of chunk b      t = n_0 + ... + n_{b-1} + i             flat q/k/v [T, H, D]
      its position              p = start_b + i
      its cache row (slot)      table_b[p // bs] * bs + p % bs          cache.view(-1, H, D)
    key j of chunk b            cache[table_b[j // bs], j % bs]         keys [G, J, H, D]
      (so key j IS position j)
      visible to token i iff    j <= start_b + i and j < start_b + n_b
    padded query row i >= n_b   sees [0, start_b + n_b): never empty, output dropped

Chunks are attended in groups (decode chunks together, prefill chunks together); within a group
J = max_blocks * bs and short block tables are padded with block 0, whose keys are masked out.
New K/V are written to the cache BEFORE the gather, so a chunk sees its own tokens exactly as it
sees prefix-cached tokens or blocks another process wrote: only through the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from splitwise.engine.model.layers import RMSNorm
from splitwise.engine.model.rope import apply_rotary


def _pad_tables(tables: Sequence[Sequence[int]]) -> torch.Tensor:
    """[len(tables), max_blocks] int64, short tables padded with block 0 (always masked out)."""
    max_blocks = max(len(t) for t in tables)
    padded = [list(t) + [0] * (max_blocks - len(t)) for t in tables]
    return torch.tensor(padded, dtype=torch.int64).view(len(tables), max_blocks)


@dataclass(frozen=True)
class AttentionGroup:
    """Chunks attended to in one SDPA call, padded to the group's longest chunk and context."""

    token_index: torch.Tensor  # [G, max_new] int64: flat token index of (chunk, i); padding -> 0
    token_valid: torch.Tensor  # [G, max_new] bool: i < n_b
    block_tables: torch.Tensor  # [G, max_blocks] int64
    attn_mask: torch.Tensor  # [G, 1, max_new, max_blocks * block_size] bool: True = may attend

    @staticmethod
    def build(
        starts: Sequence[int],
        counts: Sequence[int],
        first_tokens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        sliding_window: int | None = None,
    ) -> AttentionGroup:
        tables = _pad_tables(block_tables)
        start = torch.tensor(starts, dtype=torch.int64)[:, None]
        count = torch.tensor(counts, dtype=torch.int64)[:, None]
        offset = torch.arange(max(counts), dtype=torch.int64)[None, :]  # i
        valid = offset < count
        token_index = torch.where(valid, torch.tensor(first_tokens, dtype=torch.int64)[:, None] + offset, 0)
        key_pos = torch.arange(tables.shape[1] * block_size, dtype=torch.int64)[None, None, :]
        query_pos = (start + offset)[:, :, None]
        attn_mask = (key_pos <= query_pos) & (key_pos < (start + count)[:, :, None])
        if sliding_window is not None:  # as HF: a query at q sees keys k with q - k < window
            attn_mask &= key_pos > query_pos - sliding_window
        return AttentionGroup(token_index, valid, tables, attn_mask[:, None])

    def to(self, device: torch.device | str) -> AttentionGroup:
        return AttentionGroup(
            token_index=self.token_index.to(device),
            token_valid=self.token_valid.to(device),
            block_tables=self.block_tables.to(device),
            attn_mask=self.attn_mask.to(device),
        )


@dataclass(frozen=True)
class AttentionMetadata:
    """Where a step's tokens live in the cache and who may attend to whom. Built once per step,
    shared by every layer.

    Decode chunks (1 token) and prefill chunks go in separate groups: padding every decode row
    of a mixed batch to the prefill chunk's length would cost O(batch * chunk * context) memory.
    """

    positions: torch.Tensor  # [T] int64: absolute position of each new token
    slot_mapping: torch.Tensor  # [T] int64: cache row of each new token
    groups: tuple[AttentionGroup, ...]

    @staticmethod
    def build(
        starts: Sequence[int],
        num_new_tokens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str,
        sliding_window: int | None = None,
    ) -> AttentionMetadata:
        """``block_tables[b]`` must cover positions [0, starts[b] + num_new_tokens[b])."""
        count = torch.tensor(num_new_tokens, dtype=torch.int64)
        first_token = torch.cumsum(count, 0) - count  # flat index of each chunk's token 0
        chunk_of_token = torch.repeat_interleave(torch.arange(len(starts)), count)  # [T]
        offset = torch.arange(int(count.sum())) - first_token[chunk_of_token]
        positions = torch.tensor(starts, dtype=torch.int64)[chunk_of_token] + offset
        block_ids = _pad_tables(block_tables)[chunk_of_token, positions // block_size]
        slot_mapping = block_ids * block_size + positions % block_size

        groups = []
        for members in _partition_by_kind(num_new_tokens):
            group = AttentionGroup.build(
                starts=[starts[b] for b in members],
                counts=[num_new_tokens[b] for b in members],
                first_tokens=[int(first_token[b]) for b in members],
                block_tables=[block_tables[b] for b in members],
                block_size=block_size,
                sliding_window=sliding_window,
            )
            groups.append(group.to(device))
        return AttentionMetadata(positions.to(device), slot_mapping.to(device), tuple(groups))


def _partition_by_kind(num_new_tokens: Sequence[int]) -> list[list[int]]:
    """Chunk indices split into [decode chunks, prefill chunks], empty parts dropped."""
    decode = [b for b, n in enumerate(num_new_tokens) if n == 1]
    prefill = [b for b, n in enumerate(num_new_tokens) if n > 1]
    return [part for part in (decode, prefill) if part]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Write k/v [T, Hkv, D] into the layer's cache [num_blocks, bs, Hkv, D], then attend.

    Returns [T, Hq, D]. Scale is 1/sqrt(D) (SDPA's default, as in every supported family).
    """
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    k_rows = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    v_rows = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    k_rows.index_copy_(0, meta.slot_mapping, k.to(k_rows.dtype))
    v_rows.index_copy_(0, meta.slot_mapping, v.to(v_rows.dtype))

    out = torch.empty_like(q)
    for group in meta.groups:
        num_chunks, max_blocks = group.block_tables.shape
        context_shape = (num_chunks, max_blocks * block_size, num_kv_heads, head_dim)
        keys = k_cache[group.block_tables].view(context_shape).to(q.dtype)
        values = v_cache[group.block_tables].view(context_shape).to(q.dtype)
        queries = q[group.token_index]  # [G, max_new, Hq, D]
        attended = F.scaled_dot_product_attention(
            queries.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=group.attn_mask,
            enable_gqa=q.shape[1] != num_kv_heads,
        )
        valid = group.token_valid
        out.index_copy_(0, group.token_index[valid], attended.transpose(1, 2)[valid])
    return out


class Attention(nn.Module):
    """Self-attention of one decoder layer. Attribute names match the HF checkpoints."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm_eps: float | None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias)
        # Qwen3 normalises each head of q and k before rope.
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q = self.q_proj(hidden).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = paged_attention(q, k, v, k_cache, v_cache, meta)
        projected: torch.Tensor = self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))
        return projected
