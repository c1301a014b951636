"""Options and helpers shared by several commands."""

from __future__ import annotations

from pathlib import Path

import click


def resolve_model(model: str | None, *, default_size: str = "tiny") -> Path:
    """--model DIR, or the built-in checkpoint (generated once, cached) when it is left out."""
    if model is None:
        from splitwise.engine.tiny_model import default_model_dir

        return default_model_dir(default_size)
    path = Path(model)
    if not path.is_dir():
        raise click.BadParameter(f"{model} is not a directory", param_hint="--model")
    if not (path / "config.json").is_file():
        raise click.BadParameter(
            f"{model} has no config.json (expected a Hugging Face model directory)", param_hint="--model"
        )
    return path
