"""Frozen, validated configuration of the model (read from config.json) and of the engine.

Values discovered at run time (number of KV blocks, eos ids) live in ``EngineRuntime`` and
``KVCacheGeometry``, never patched into these objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splitwise.engine.errors import ModelLoadError, UnsupportedArchitectureError

# HF `architectures[0]` -> our family name. All are the Llama decoder with small variations.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"--dtype: {name!r} is not one of {sorted(DTYPES)}") from None


def _rope_theta(cfg: dict[str, Any]) -> float:
    # transformers >= 5 writes rope settings under "rope_parameters" instead of top-level keys.
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The rope scaling dict, or None for plain rope (both config.json generations)."""
    if cfg.get("rope_scaling") is not None:
        scaling: dict[str, Any] | None = cfg["rope_scaling"]
        return scaling
    params = cfg.get("rope_parameters") or {}
    if params.get("rope_type", params.get("type", "default")) == "default":
        return None
    return {k: v for k, v in params.items() if k != "rope_theta"}


@dataclass(frozen=True)
class ModelConfig:
    """The parts of a Hugging Face config.json the engine uses."""

    family: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # qkv projections carry a bias (Qwen2)
    qk_norm: bool  # per-head RMSNorm on q and k before rope (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None  # Mistral v0.1: a query sees only the last `sliding_window` keys
    torch_dtype: str | None = None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"architecture {arch!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        try:
            num_heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            return cls(
                family=family,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
                head_dim=int(cfg.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=_rope_theta(cfg),
                rope_scaling=_rope_scaling(cfg),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", family == "qwen2")),
                qk_norm=family == "qwen3",
                sliding_window=_sliding_window(cfg, family),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            )
        except KeyError as exc:
            raise ModelLoadError(f"config.json is missing required field {exc.args[0]!r}") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"--model: {model_dir} has no config.json")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{path}: invalid JSON ({exc})") from None
        return cls.from_dict(data)


@dataclass(frozen=True)
class EngineConfig:
    """Engine knobs. Validated at construction; every error names the CLI flag."""

    model: str
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: derive from kv_cache_memory_bytes
    kv_cache_memory_bytes: int = 256 * 1024 * 1024
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # token budget of one step; also the prefill chunk size
    enable_prefix_caching: bool = True
    seed: int = 0
    kv_cache_shm_name: str | None = None  # allocate the CPU KV cache in POSIX shared memory (ipc transfer)
    # Produce output text. Serving instances turn it off (their frontend detokenizes); the engine
    # then decodes text only for requests with stop strings, which it must check.
    detokenize: bool = True
    # CUDA only: replay all-decode steps as captured CUDA graphs, one per (batch, context) bucket.
    cuda_graphs: bool = True
    # Ranks of one instance (#14): one process per rank, Megatron-style sharding (engine.parallel).
    tensor_parallel_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"--device: {self.device!r} must be 'cpu' or 'cuda[:N]'")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size: {self.block_size} must be a power of two >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"--num-kv-blocks: {self.num_kv_blocks} must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"--max-model-len: {self.max_model_len} must be >= 1")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size: {self.tensor_parallel_size} must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs: {self.max_num_seqs} must be >= 1")
        if self.max_num_batched_tokens < self.block_size:
            raise ValueError(
                f"--max-num-batched-tokens: {self.max_num_batched_tokens} must be >= --block-size"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)


def _sliding_window(cfg: dict[str, Any], family: str) -> int | None:
    """Mistral's ``sliding_window`` applies to every layer; Qwen's per-layer windows are not supported."""
    if family in ("qwen2", "qwen3"):
        if cfg.get("use_sliding_window"):
            raise UnsupportedArchitectureError(
                "use_sliding_window=true (Qwen sliding-window layers) is not supported; full-attention Qwen checkpoints are"
            )
        return None
    if family != "mistral":
        return None
    window = cfg.get("sliding_window")
    if window is None:
        return None
    if not isinstance(window, int) or window < 1:
        raise ModelLoadError(
            f"config.json: sliding_window must be a positive integer or null, got {window!r}"
        )
    return window
