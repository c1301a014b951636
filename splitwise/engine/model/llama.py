"""The decoder shared by Llama 2/3, Mistral, Qwen2 and Qwen3.

The families differ only in flags read from ``ModelConfig``:

    family    qkv bias   o_proj bias        q/k RMSNorm   notes
    llama     attention_bias (all four)      no           llama3 / linear rope scaling
    mistral   no          no                 no
    qwen2     yes         no                 no
    qwen3     attention_bias (all four)      yes

Module and parameter names mirror the HF checkpoints (``model.layers.N.self_attn.q_proj.weight``)
so the loader maps tensors by name, with no translation table.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from splitwise.engine.config import ModelConfig
from splitwise.engine.kv_cache import KVCache
from splitwise.engine.model.attention import Attention
from splitwise.engine.model.attention_metadata import AttentionMetadata
from splitwise.engine.model.layers import RMSNorm, SwiGLUMLP
from splitwise.engine.model.rope import RotaryEmbedding


def _o_proj_has_bias(config: ModelConfig) -> bool:
    # HF Llama/Qwen3 put `attention_bias` on o_proj too; Qwen2's fixed qkv bias stops there.
    return config.attention_bias and config.family in ("llama", "qwen3")


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(
            config.hidden_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            qkv_bias=config.attention_bias,
            o_bias=_o_proj_has_bias(config),
            qk_norm_eps=config.rms_norm_eps if config.qk_norm else None,
        )
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, k_cache, v_cache, meta)
        out: torch.Tensor = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return out


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """Token ids in, float32 logits of selected tokens out, KV written to the paged cache.

    Construct it anywhere (the loader builds it on the meta device), then call
    ``materialize(device)`` before use: it sets up the rope tables and re-ties embeddings.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary: RotaryEmbedding | None = None
        self.tie_weights()

    def tie_weights(self) -> None:
        """With tied embeddings lm_head IS the embedding matrix (same Parameter)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def materialize(self, device: torch.device | str) -> None:
        """Call after the parameters live on ``device`` and are loaded; moving modules can untie
        parameters. Fuses q/k/v and gate/up into single matmuls (fewer ops per layer)."""
        self.tie_weights()
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            layer.self_attn.fuse_qkv()
            layer.mlp.fuse_gate_up()
        cfg = self.config
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, device=device)

    def forward(
        self,
        input_ids: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: KVCache,
        logits_indices: torch.Tensor,
        layer_callback: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """input_ids [T] (flat, chunk after chunk) -> float32 logits [len(logits_indices), vocab].

        ``layer_callback(L)`` runs after layer L's K/V for all T tokens are in the cache and before
        layer L+1 starts. On CUDA the writes are queued on the current stream: a callback that
        reads the cache from another stream must synchronise first.
        """
        if self.rotary is None:
            raise RuntimeError("CausalLM.materialize(device) was not called")
        hidden = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(meta.positions, hidden.dtype)
        for index, layer in enumerate(self.model.layers):
            hidden = layer(hidden, cos, sin, kv_cache.k(index), kv_cache.v(index), meta)
            if layer_callback is not None:
                layer_callback(index)
        # Norm and lm_head are per token: apply them only where logits are wanted.
        hidden = self.model.norm(hidden.index_select(0, logits_indices))
        logits: torch.Tensor = self.lm_head(hidden).float()
        return logits
