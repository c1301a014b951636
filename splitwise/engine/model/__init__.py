"""The decoder forward pass over the paged KV cache (Llama/Mistral/Qwen2/Qwen3)."""

from __future__ import annotations

from splitwise.engine.model.attention import paged_attention
from splitwise.engine.model.attention_metadata import AttentionMetadata
from splitwise.engine.model.llama import CausalLM
from splitwise.engine.model.rope import SUPPORTED_ROPE_TYPES, compute_inv_freq

__all__ = ["AttentionMetadata", "CausalLM", "SUPPORTED_ROPE_TYPES", "compute_inv_freq", "paged_attention"]
