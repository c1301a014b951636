"""Attention over the paged KV cache: write the step's new K/V, then one SDPA call per kind of
chunk (the index arithmetic and the choice of calls are in ``attention_metadata``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitwise.engine.model.attention_metadata import (
    AttentionMetadata,
    DecodeBatch,
    GatherBuffers,
    PrefillChunk,
)
from splitwise.engine.model.layers import RMSNorm
from splitwise.engine.model.packed_linear import linear, pack_weight
from splitwise.engine.model.rope import apply_rotary


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Write k/v [T, Hkv, D] into the layer's cache [num_blocks, Hc, bs, D], then attend.

    Hc = Hkv except on a tensor-parallel rank on CPU, whose cache holds every head of the
    instance and whose Hkv heads ``meta``'s rows address (``attention_metadata``).
    Returns [T, Hq, D]. Scale is 1/sqrt(D) (SDPA's default, as in every supported family).
    No host syncs: every index was built on the host once per step.
    """
    head_dim = k_cache.shape[-1]
    k_rows, v_rows = k_cache.view(-1, head_dim), v_cache.view(-1, head_dim)
    k_rows.index_put_((meta.kv_write_rows,), k.to(k_rows.dtype))
    v_rows.index_put_((meta.kv_write_rows,), v.to(v_rows.dtype))

    decode = meta.decode
    if decode is not None and not meta.prefills and decode.first_row == 0:
        return _attend_decode(q, k_cache, v_cache, decode, meta.buffers, k.shape[1])  # all decode: no scatter
    out = torch.empty_like(q)
    if decode is not None:
        attended = _attend_decode(q, k_cache, v_cache, decode, meta.buffers, k.shape[1])
        if decode.first_row is not None:
            out.narrow(0, decode.first_row, decode.num_chunks).copy_(attended)
        else:
            out.index_copy_(0, decode.token_index, attended)
    for chunk in meta.prefills:
        rows = out.narrow(0, chunk.first_row, chunk.num_tokens)
        rows.copy_(_attend_prefill(q, k, v, k_cache, v_cache, chunk, meta.buffers))
    return out


def _gather_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_rows: torch.Tensor,
    num_seqs: int,
    num_kv_heads: int,
    num_keys: int,
    buffers: GatherBuffers | None,
    math_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [num_seqs, Hkv, num_keys, D] in ``math_dtype``: rows [bs, D] (one kv head of one
    block) copied by one index_select each, in (seq, head, block) order, then narrowed to the
    visible keys (a view)."""
    _, _, block_size, head_dim = k_cache.shape
    k_src, v_src = k_cache.view(-1, block_size, head_dim), v_cache.view(-1, block_size, head_dim)
    if buffers is None:
        k_got, v_got = k_src.index_select(0, kv_rows), v_src.index_select(0, kv_rows)
    else:
        k_got, v_got = buffers.get(k_src, kv_rows.shape[0])
        torch.index_select(k_src, 0, kv_rows, out=k_got)
        torch.index_select(v_src, 0, kv_rows, out=v_got)
    if math_dtype != k_cache.dtype:  # convert whole contiguous rows: the fast cast path
        if buffers is None:
            k_got, v_got = k_got.to(math_dtype), v_got.to(math_dtype)
        else:
            k_math, v_math = buffers.get(k_src, kv_rows.shape[0], math_dtype)
            k_got, v_got = k_math.copy_(k_got), v_math.copy_(v_got)
    keys = k_got.view(num_seqs, num_kv_heads, -1, head_dim)[:, :, :num_keys]
    values = v_got.view(num_seqs, num_kv_heads, -1, head_dim)[:, :, :num_keys]
    return keys, values


def _sdpa(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    attn_mask: torch.Tensor | None,
    *,
    is_causal: bool = False,
) -> torch.Tensor:
    """[N, Lq, Hq, D] x [N, Hkv, Lk, D] -> [N, Lq, Hq, D] in the queries' dtype (keys and values
    already in the math dtype); the transposes are views."""
    dtype, math_dtype = queries.dtype, keys.dtype
    attended = F.scaled_dot_product_attention(
        queries.to(math_dtype).transpose(1, 2),
        keys,
        values,
        attn_mask=attn_mask,
        is_causal=is_causal,
        enable_gqa=queries.shape[2] != keys.shape[1],
    )
    return attended.transpose(1, 2).to(dtype)


def _sdpa_math_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half precision on CPU: torch's CPU flash kernel measured 5x slower in bf16 than
    in fp32 at decode (4.2 vs 0.8 ms per layer, batch 8, context 512), far more than the casts."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return x.dtype


def _decode_math_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the CPU decode matmuls: bf16 stays bf16 (native bf16 dot products, measured
    2.2x faster than casting to fp32 for SDPA at batch 8 / context 512), fp16 runs in fp32."""
    return torch.float32 if x.dtype == torch.float16 else x.dtype


def _decode_bmm(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, masked: torch.Tensor | None
) -> torch.Tensor:
    """[G, Hq, D] x [G, Hkv, J, D] -> [G, Hq, D] with two batched matmuls over (sequence, kv head):
    the Hq / Hkv query heads of a group are the rows of one matmul (GQA without repeating K/V).
    Scores and softmax in float32; ``masked`` [G, 1, 1, J] bool (True = may NOT attend) or additive."""
    g, num_q, head_dim = queries.shape
    _, num_kv, num_keys, _ = keys.shape
    group = num_q // num_kv
    q = queries.to(keys.dtype).reshape(g * num_kv, group, head_dim)
    scores = torch.bmm(q, keys.reshape(g * num_kv, num_keys, head_dim).transpose(1, 2))
    scores = scores.view(g, num_kv, group, num_keys).float().mul_(head_dim**-0.5)
    if masked is not None:
        if masked.dtype == torch.bool:
            scores = scores.masked_fill_(masked, float("-inf"))
        else:
            scores = scores.add_(masked)
    probs = torch.softmax(scores, dim=-1).to(values.dtype).view(g * num_kv, group, num_keys)
    out = torch.bmm(probs, values.reshape(g * num_kv, num_keys, head_dim))
    return out.view(g, num_q, head_dim).to(queries.dtype)


def decode_bias_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``DecodeBatch.attn_bias`` for a CPU model in ``model_dtype``."""
    return torch.float32 if model_dtype == torch.float16 else model_dtype


def _decode_bmm_biased(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """``_decode_bmm`` with the mask as an additive ``bias`` [G * Hkv, 1, J]: scale and mask are
    folded into one ``baddbmm`` and the float32 softmax reads the matmul dtype directly (4 ops
    per layer instead of 7). Bit-identical to ``_decode_bmm`` when 1/sqrt(D) is a power of two
    (D = 64, 256: the scale is exact in any dtype)."""
    g, num_q, head_dim = queries.shape
    _, num_kv, num_keys, _ = keys.shape
    q = queries.to(keys.dtype).reshape(g * num_kv, num_q // num_kv, head_dim)
    k_t = keys.reshape(g * num_kv, num_keys, head_dim).transpose(1, 2)
    scores = torch.baddbmm(bias, q, k_t, alpha=head_dim**-0.5)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    out = torch.bmm(probs, values.reshape(g * num_kv, num_keys, head_dim))
    return out.view(g, num_q, head_dim).to(queries.dtype)


def _attend_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: DecodeBatch,
    buffers: GatherBuffers | None,
    num_kv_heads: int,
) -> torch.Tensor:
    """[G, Hq, D] for the G decode queries (of ``num_kv_heads`` kv heads). CPU: two bmm (``_decode_bmm``); CUDA: SDPA, whose
    kernels take the head-major keys as they are."""
    g = batch.num_chunks
    if batch.first_row is not None:
        queries = q.narrow(0, batch.first_row, g)
    else:
        queries = q.index_select(0, batch.token_index)
    on_cpu = q.device.type == "cpu"
    math_dtype = _decode_math_dtype(k_cache) if on_cpu else k_cache.dtype
    keys, values = _gather_kv(
        k_cache, v_cache, batch.kv_rows, g, num_kv_heads, batch.num_keys, buffers, math_dtype
    )
    if on_cpu and batch.attn_bias is not None and batch.attn_bias.dtype == keys.dtype:
        return _decode_bmm_biased(queries, keys, values, batch.attn_bias)
    if on_cpu:
        masked = batch.masked_out if batch.masked_out is not None else batch.attn_mask
        return _decode_bmm(queries, keys, values, masked)
    return _sdpa(queries[:, None], keys, values, batch.attn_mask)[:, 0]


def _attend_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    chunk: PrefillChunk,
    buffers: GatherBuffers | None,
) -> torch.Tensor:
    """[n, Hq, D] for one chunk's n queries."""
    queries = q.narrow(0, chunk.first_row, chunk.num_tokens)[None]
    math_dtype = _sdpa_math_dtype(k_cache)
    if chunk.kv_rows is None:  # fresh prefill: its keys are exactly its own new tokens
        keys = k.narrow(0, chunk.first_row, chunk.num_tokens)[None].to(math_dtype).transpose(1, 2)
        values = v.narrow(0, chunk.first_row, chunk.num_tokens)[None].to(math_dtype).transpose(1, 2)
        causal = chunk.attn_mask is None
        return _sdpa(queries, keys, values, chunk.attn_mask, is_causal=causal)[0]
    keys, values = _gather_kv(
        k_cache, v_cache, chunk.kv_rows, 1, k.shape[1], chunk.num_keys, buffers, math_dtype
    )
    return _sdpa(queries, keys, values, chunk.attn_mask)[0]


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
        self.qkv_weight: torch.Tensor | None = None
        self.qkv_bias: torch.Tensor | None = None
        self.qkv_packed: torch.Tensor | None = None  # see packed_linear

    def fuse_qkv(self) -> None:
        """After loading: q, k and v in one matmul. The three projections' parameters become views
        of the fused weight (no extra memory; names and state_dict are unchanged)."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        with torch.no_grad():
            self.qkv_weight = torch.cat([p.weight for p in projections])
            self.qkv_bias = None
            if self.q_proj.bias is not None:
                self.qkv_bias = torch.cat([p.bias for p in projections if p.bias is not None])
            start = 0
            for proj in projections:
                rows = proj.weight.shape[0]
                proj.weight = nn.Parameter(self.qkv_weight[start : start + rows], requires_grad=False)
                if self.qkv_bias is not None:
                    proj.bias = nn.Parameter(self.qkv_bias[start : start + rows], requires_grad=False)
                start += rows

    def pack_weights(self) -> bool:
        """After ``fuse_qkv``: a oneDNN-packed copy of the fused weight (bf16 on CPU only)."""
        if self.qkv_weight is None:
            raise RuntimeError("Attention.fuse_qkv() must run before pack_weights()")
        self.qkv_packed = pack_weight(self.qkv_weight)
        return self.qkv_packed is not None

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        if self.qkv_weight is None:
            raise RuntimeError("Attention.fuse_qkv() was not called (CausalLM.materialize does it)")
        num_tokens, num_q = hidden.shape[0], self.num_heads
        qkv = linear(hidden, self.qkv_weight, self.qkv_bias, self.qkv_packed)
        heads = qkv.view(num_tokens, num_q + 2 * self.num_kv_heads, self.head_dim)
        v = heads[:, num_q + self.num_kv_heads :]
        if self.q_norm is not None and self.k_norm is not None:
            q = apply_rotary(self.q_norm(heads[:, :num_q]), cos, sin)
            k = apply_rotary(self.k_norm(heads[:, num_q : num_q + self.num_kv_heads]), cos, sin)
        else:  # q and k are adjacent heads: rotate them in one go
            qk = apply_rotary(heads[:, : num_q + self.num_kv_heads], cos, sin)
            q, k = qk[:, :num_q], qk[:, num_q:]
        out = paged_attention(q, k, v, k_cache, v_cache, meta)
        projected: torch.Tensor = self.o_proj(out.reshape(num_tokens, num_q * self.head_dim))
        return projected
