"""The parallel layers, swapped into a ``CausalLM`` built with the per-rank shapes.

The decoder modules stay as they are (``llama.py``): a rank's model is the same CausalLM with
Hq/tp query heads, its KV heads and I/tp MLP width; ``shard_modules`` then replaces the four
modules whose results must be combined across ranks. Names and parameter shapes are the
per-rank slices of the checkpoint's (``loader`` fills them).

    module                    replaced by            forward
    embed_tokens              VocabParallelEmbedding  own rows looked up, others 0, all-reduce
    self_attn.o_proj          RowParallelLinear       x_r @ W_r^T, all-reduce, + bias (once)
    mlp.down_proj             RowParallelLinear       same
    lm_head                   ParallelLMHead          own vocab rows' logits, all-gather, trim
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitwise.engine.model.llama import CausalLM, DecoderLayer
from splitwise.engine.parallel.group import RankGroup
from splitwise.engine.parallel.layout import TPLayout


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r @ W_r^T, then + bias: the bias is added after the reduction so
    it counts once."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, group: RankGroup) -> None:
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.group.all_reduce(F.linear(x, self.weight))
        return out + self.bias if self.bias is not None else out


class VocabParallelEmbedding(nn.Module):
    """Rank r holds rows [first, first + n) (zero-padded to ``vocab_per_rank``)."""

    def __init__(self, layout: TPLayout, hidden_size: int, *, rank: int, group: RankGroup) -> None:
        super().__init__()
        self.group = group
        self.first = layout.vocab(rank).start
        self.num_rows = layout.vocab_per_rank
        self.weight = nn.Parameter(torch.empty(self.num_rows, hidden_size), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.first
        outside = (local < 0) | (local >= self.num_rows)
        hidden = F.embedding(local.masked_fill(outside, 0), self.weight)
        hidden.masked_fill_(outside[:, None], 0.0)
        return self.group.all_reduce(hidden)  # exactly one rank contributes each row: exact


class ParallelLMHead(nn.Module):
    """Logits of every rank's vocab shard, gathered and trimmed to the real vocabulary: every
    rank ends with the full [T, V] logits (rank 0 samples; the others drop them)."""

    def __init__(self, layout: TPLayout, hidden_size: int, *, group: RankGroup) -> None:
        super().__init__()
        self.group = group
        self.vocab_size = layout.vocab_size
        self.weight = nn.Parameter(torch.empty(layout.vocab_per_rank, hidden_size), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        parts = self.group.all_gather(F.linear(hidden, self.weight))
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]


def shard_modules(model: CausalLM, layout: TPLayout, *, rank: int, group: RankGroup) -> None:
    """Replace the combining modules of a per-rank CausalLM (built on the meta device or not)."""
    cfg = model.config
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    with torch.device(device):
        model.model.embed_tokens = VocabParallelEmbedding(  # type: ignore[assignment]
            layout, cfg.hidden_size, rank=rank, group=group
        )
        model.lm_head = ParallelLMHead(layout, cfg.hidden_size, group=group)  # type: ignore[assignment]
        for layer in model.model.layers:
            assert isinstance(layer, DecoderLayer)
            attn, mlp = layer.self_attn, layer.mlp
            attn.o_proj = RowParallelLinear(  # type: ignore[assignment]
                attn.num_heads * attn.head_dim,
                cfg.hidden_size,
                bias=attn.o_proj.bias is not None,
                group=group,
            )
            mlp.down_proj = RowParallelLinear(  # type: ignore[assignment]
                mlp.intermediate_size, cfg.hidden_size, bias=False, group=group
            )
    model.to(dtype)
