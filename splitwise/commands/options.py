"""Options and helpers shared by several commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def resolve_model(model: str | None, *, default_size: str = "tiny") -> Path:
    """--model DIR, or the built-in checkpoint (generated once, cached) when it is left out."""
    if model is None:
        from splitwise.engine.tiny_model import default_model_dir

        return default_model_dir(default_size)
    path = Path(model)
    if not path.is_dir():
        looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
        hint = (
            " (a hub id? splitwise loads local checkpoints: download it first)" if looks_like_hub_id else ""
        )
        raise click.BadParameter(f"{model} is not a directory{hint}", param_hint="--model")
    if not (path / "config.json").is_file():
        raise click.BadParameter(
            f"{model} has no config.json (expected a Hugging Face model directory)", param_hint="--model"
        )
    return path


def read_model_config(model_dir: str) -> dict[str, Any]:
    """The checkpoint's config.json (``resolve_model`` checked that it exists)."""
    try:
        data = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(
            f"{model_dir}/config.json is unreadable: {exc}", param_hint="--model"
        ) from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{model_dir}/config.json is not a JSON object", param_hint="--model")
    return data
