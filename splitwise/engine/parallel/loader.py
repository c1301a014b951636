"""Load one rank's slice of a safetensors checkpoint into a per-rank ``CausalLM``.

Each rank reads only its rows/columns (``safe_open(...).get_slice``), so N ranks read the
checkpoint once between them. Which slice, by tensor name (d = head_dim)::

    tensor                        dim  rank r's indices
    q_proj.weight / .bias         0    q heads(r) * d
    k_proj, v_proj .weight/.bias  0    model KV heads(r) * d   (a replicated head on several ranks)
    o_proj.weight                 1    q heads(r) * d          (o_proj.bias: whole, added once)
    gate_proj, up_proj .weight    0    MLP slice(r)
    down_proj.weight              1    MLP slice(r)
    embed_tokens, lm_head .weight 0    vocab rows(r), zero-padded to ceil(V / tp)
    everything else (norms)       -    whole
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from splitwise.engine.config import ModelConfig
from splitwise.engine.errors import ModelLoadError
from splitwise.engine.loader import _is_ignorable, weight_files
from splitwise.engine.model.llama import CausalLM
from splitwise.engine.model.rope import compute_inv_freq
from splitwise.engine.parallel.group import RankGroup
from splitwise.engine.parallel.layers import shard_modules
from splitwise.engine.parallel.layout import TPLayout


def shard_config(config: ModelConfig, layout: TPLayout) -> ModelConfig:
    """The model config of one rank's CausalLM (vocab stays whole: the runner checks ids with it)."""
    return dataclasses.replace(
        config,
        num_heads=layout.heads_per_rank,
        num_kv_heads=layout.kv_heads_per_rank,
        intermediate_size=layout.intermediate_per_rank,
    )


def load_shard(
    model_dir: str | Path,
    config: ModelConfig,
    layout: TPLayout,
    *,
    rank: int,
    group: RankGroup,
    dtype: torch.dtype,
    device: torch.device,
) -> CausalLM:
    compute_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    files = weight_files(model_dir)
    with torch.device("meta"):
        model = CausalLM(shard_config(config, layout))
        shard_modules(model, layout, rank=rank, group=group)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    _copy_slices(model, files, layout, rank)
    model.materialize(device)
    return model.eval()


def slice_of(name: str, layout: TPLayout, rank: int, head_dim: int) -> tuple[int, range] | None:
    """(dim, indices) of ``name`` that ``rank`` holds; None: the whole tensor."""
    leaf = ".".join(name.split(".")[-2:])
    heads: range | None = None
    if leaf in ("q_proj.weight", "q_proj.bias", "o_proj.weight"):
        heads = layout.q_heads(rank)
    elif leaf in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
        heads = layout.model_kv_heads(rank)
    if heads is not None:
        return (1 if leaf == "o_proj.weight" else 0), range(heads.start * head_dim, heads.stop * head_dim)
    if leaf in ("gate_proj.weight", "up_proj.weight"):
        return 0, layout.intermediate(rank)
    if leaf == "down_proj.weight":
        return 1, layout.intermediate(rank)
    if leaf in ("embed_tokens.weight", "lm_head.weight"):
        return 0, layout.vocab(rank)
    return None


def _read(shard: Any, name: str, where: tuple[int, range] | None) -> torch.Tensor:
    if where is None:
        tensor: torch.Tensor = shard.get_tensor(name)
        return tensor
    dim, rows = where
    part = shard.get_slice(name)
    sliced: torch.Tensor = part[rows.start : rows.stop] if dim == 0 else part[:, rows.start : rows.stop]
    return sliced


def _copy_slices(model: CausalLM, files: list[Path], layout: TPLayout, rank: int) -> None:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    head_dim = model.config.head_dim
    with torch.no_grad():
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as shard:
                for name in shard.keys():  # noqa: SIM118 - safe_open is not a dict
                    if name not in params:
                        if _is_ignorable(name, model):
                            continue
                        raise ModelLoadError(f"{path.name}: unexpected tensor {name!r}")
                    tensor = _read(shard, name, slice_of(name, layout, rank, head_dim))
                    param = params[name]
                    padded = name.endswith(("embed_tokens.weight", "lm_head.weight"))
                    target = param[: tensor.shape[0]] if padded else param
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise ModelLoadError(
                            f"{path.name}: rank {rank}'s slice of {name!r} has shape "
                            f"{tuple(tensor.shape)}, expected {tuple(param.shape)}"
                        )
                    if target.shape[0] != param.shape[0]:
                        param[tensor.shape[0] :].zero_()  # vocab padding of the last shard
                    target.copy_(tensor)
                    loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ModelLoadError(f"checkpoint is missing tensor(s) {missing[:5]}")
