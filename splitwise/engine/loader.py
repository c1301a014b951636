"""Load a Hugging Face safetensors checkpoint (single file or sharded) into ``CausalLM``.

Parameter names of ``CausalLM`` equal the checkpoint's tensor names, so loading is: list the
files, check every tensor's name and shape against the model, copy. Anything that does not fit
is a ``ModelLoadError`` naming the tensor: a silently skipped bias gives wrong logits, not a crash.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from splitwise.engine.config import ModelConfig
from splitwise.engine.errors import ModelLoadError
from splitwise.engine.model.llama import CausalLM
from splitwise.engine.model.rope import compute_inv_freq

INDEX_FILE = "model.safetensors.index.json"

# Tensors some checkpoints carry that the model derives or shares instead of loading.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def weight_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's safetensors files: the shards the index names, else every *.safetensors."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelLoadError(f"--model: {root} is not a directory")
    index_path = root / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index_path}: not a valid safetensors index ({exc!r})") from None
        shards = [root / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise ModelLoadError(f"{index_path} names shard files that do not exist: {missing}")
        return shards
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"--model: {root} has no *.safetensors weight files")
    return files


def load_model(
    model_dir: str | Path, config: ModelConfig, *, dtype: torch.dtype, device: torch.device | str
) -> CausalLM:
    """Build the model on ``device`` in ``dtype`` and fill every parameter from the checkpoint."""
    # Reject unsupported rope before reading gigabytes of weights.
    compute_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    files = weight_files(model_dir)

    # Meta construction allocates nothing and skips random init; to_empty then allocates once.
    with torch.device("meta"):
        model = CausalLM(config)
    model = model.to(dtype).to_empty(device=device)
    model.tie_weights()
    _copy_tensors(model, files)
    model.materialize(device)
    return model.eval()


def _copy_tensors(model: CausalLM, files: list[Path]) -> None:
    params = dict(model.named_parameters())  # tied lm_head is deduplicated away here
    loaded: set[str] = set()
    with torch.no_grad():
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as shard:
                for name in shard.keys():  # noqa: SIM118 - safe_open is not a dict
                    if name not in params:
                        if _is_ignorable(name, model):
                            continue
                        raise ModelLoadError(
                            f"{path.name}: unexpected tensor {name!r} (not part of a "
                            f"{model.config.family} model; unsupported variant?)"
                        )
                    tensor = shard.get_tensor(name)
                    param = params[name]
                    if tuple(tensor.shape) != tuple(param.shape):
                        raise ModelLoadError(
                            f"{path.name}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                            f"expected {tuple(param.shape)}"
                        )
                    param.copy_(tensor)
                    loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"checkpoint is missing tensor(s) {shown}{more}")


def _is_ignorable(name: str, model: CausalLM) -> bool:
    if _IGNORED.search(name):
        return True
    # Some tied checkpoints still store lm_head.weight (a copy of the embedding).
    return name == "lm_head.weight" and model.config.tie_word_embeddings
