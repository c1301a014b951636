"""The machine's limits, measured in the same run as the engine benchmark, and what a model's
prefill/decode step needs of them.

Two probes (best of a few runs, so a busy machine lowers them but never inflates them):

    probe        what runs                                  figure
    bandwidth    copy a 256 MiB buffer (CPU) / 1 GiB (GPU)  bytes read + written per second
    matmul       [2048, 2048] x [2048, 2048] in the dtype   multiply-adds * 2 per second

A step's roofline is max(bytes / bandwidth, flops / matmul rate): decode reads every weight and
each sequence's K/V context once per step; prefill is compute bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from splitwise.engine.config import ModelConfig


@dataclass(frozen=True)
class MachineLimits:
    bandwidth_bytes_s: float
    matmul_flops_s: float
    device: str
    dtype: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_limits(device: str, dtype: torch.dtype, repeats: int = 8) -> MachineLimits:
    dev = torch.device(device)
    size = (1 << 30) if dev.type == "cuda" else (256 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    copy_s = _best_time(lambda: dst.copy_(src), dev, repeats)
    n = 2048
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    mm_s = _best_time(lambda: torch.mm(a, b), dev, repeats)
    return MachineLimits(2 * size / copy_s, 2 * n**3 / mm_s, device, str(dtype).removeprefix("torch."))


def best_limits(samples: list[MachineLimits]) -> MachineLimits:
    """The highest bandwidth and matmul rate seen: what the machine can do when not disturbed."""
    return MachineLimits(
        max(s.bandwidth_bytes_s for s in samples),
        max(s.matmul_flops_s for s in samples),
        samples[0].device,
        samples[0].dtype,
    )


@dataclass(frozen=True)
class ModelCost:
    """Per-token costs of a decoder, from its config."""

    matmul_params: int  # weights every token multiplies (all projections and lm_head)
    lm_head_params: int  # prefill multiplies lm_head for each sequence's last token only
    kv_bytes_per_token: int  # K and V of one position over all layers
    attention_flops_per_key: int  # q.k and p.v over all layers and heads, per (query, key)
    itemsize: int

    @staticmethod
    def of(config: ModelConfig, dtype: torch.dtype) -> ModelCost:
        h, q, kv = (
            config.hidden_size,
            config.num_heads * config.head_dim,
            config.num_kv_heads * config.head_dim,
        )
        per_layer = 2 * h * q + 2 * h * kv + 3 * h * config.intermediate_size
        itemsize = torch.empty((), dtype=dtype).element_size()
        return ModelCost(
            matmul_params=config.num_layers * per_layer + config.vocab_size * h,
            lm_head_params=config.vocab_size * h,
            kv_bytes_per_token=config.num_layers * 2 * kv * itemsize,
            attention_flops_per_key=config.num_layers * 4 * q,
            itemsize=itemsize,
        )

    def decode_roofline_tok_s(self, limits: MachineLimits, batch: int, context_len: int) -> float:
        """Upper bound on decode tokens/s: one step reads all weights and every context once."""
        step_bytes = self.matmul_params * self.itemsize + batch * context_len * self.kv_bytes_per_token
        step_flops = batch * (2 * self.matmul_params + context_len * self.attention_flops_per_key)
        step_s = max(step_bytes / limits.bandwidth_bytes_s, step_flops / limits.matmul_flops_s)
        return batch / step_s

    def prefill_roofline_tok_s(self, limits: MachineLimits, batch: int, prompt_len: int) -> float:
        """Upper bound on prefill tokens/s (causal attention: ~prompt_len / 2 keys per query)."""
        tokens = batch * prompt_len
        layer_params = self.matmul_params - self.lm_head_params
        flops = tokens * (2 * layer_params + prompt_len / 2 * self.attention_flops_per_key)
        flops += batch * 2 * self.lm_head_params
        step_s = max(
            self.matmul_params * self.itemsize / limits.bandwidth_bytes_s, flops / limits.matmul_flops_s
        )
        return tokens / step_s
