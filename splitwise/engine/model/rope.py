"""Rotary position embeddings (rotate-half convention, as in the Hugging Face checkpoints).

Supported ``rope_scaling`` types: none / ``default``, ``linear`` and ``llama3`` (Llama 3.1+).
The frequency formulas mirror transformers' ``modeling_rope_utils`` so logits agree to float
rounding; every other type is rejected at load time rather than silently computed wrong.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from splitwise.engine.errors import ModelLoadError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_type_of(rope_scaling: dict[str, Any] | None) -> str:
    if not rope_scaling:
        return "default"
    # Old configs spell the key "type", new ones "rope_type".
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def _scaling_value(rope_scaling: dict[str, Any], key: str, rope_type: str) -> float:
    if key not in rope_scaling:
        raise ModelLoadError(f"rope_scaling of type {rope_type!r} is missing {key!r}")
    return float(rope_scaling[key])


def _llama3_inv_freq(inv_freq: torch.Tensor, rope_scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by ``factor``, blend in between."""
    factor = _scaling_value(rope_scaling, "factor", "llama3")
    low_freq_factor = _scaling_value(rope_scaling, "low_freq_factor", "llama3")
    high_freq_factor = _scaling_value(rope_scaling, "high_freq_factor", "llama3")
    old_context_len = _scaling_value(rope_scaling, "original_max_position_embeddings", "llama3")
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def compute_inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """float32 inverse frequencies [head_dim // 2]. Raises ModelLoadError for unknown rope types."""
    rope_type = rope_type_of(rope_scaling)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"rope type {rope_type!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    # Explicit cpu: callers may construct the model under a meta-device context.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope_theta**exponents)
    if rope_type == "linear":
        assert rope_scaling is not None
        return inv_freq / _scaling_value(rope_scaling, "factor", "linear")
    if rope_type == "llama3":
        assert rope_scaling is not None
        return _llama3_inv_freq(inv_freq, rope_scaling)
    return inv_freq


class RotaryEmbedding:
    """cos/sin tables for absolute positions; computed once per step and shared by all layers.

    A plain object rather than a module: the frequencies are derived from config.json, never
    loaded from a checkpoint, and must not be touched by meta-device construction.
    """

    def __init__(
        self,
        head_dim: int,
        rope_theta: float,
        rope_scaling: dict[str, Any] | None,
        *,
        device: torch.device | str,
    ) -> None:
        self.head_dim = head_dim
        self.inv_freq = compute_inv_freq(head_dim, rope_theta, rope_scaling).to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and *signed* sin, both [T, 1, D], for ``positions`` [T]; float32 math, then cast
        (as the reference). The first half of the signed sin is negated: see ``apply_rotary``."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin()
        signed_sin = torch.cat((-sin[:, : freqs.shape[1]], sin[:, freqs.shape[1] :]), dim=-1)
        return emb.cos().to(dtype)[:, None, :], signed_sin.to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by the per-token angles in cos/signed_sin [T, 1, D].

    The reference computes x * cos + cat(-x2, x1) * sin. roll(x) = cat(x2, x1), and negating the
    first half of sin instead of x2 gives the same products bit for bit (sign flips are exact),
    in one op instead of four (slice, slice, neg, cat); the product and sum are one ``addcmul``.
    """
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, dims=-1), signed_sin)
