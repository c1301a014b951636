"""`splitwise make-tiny-model DIR`: write a deterministic random-weight HF checkpoint for tests and demos."""

from __future__ import annotations

from pathlib import Path

import click

from splitwise.engine.tiny_model import ARCHITECTURES, SIZES, count_parameters
from splitwise.engine.tiny_model import make_tiny_model as build_model


@click.command(name="make-tiny-model")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--arch", type=click.Choice(sorted(ARCHITECTURES)), default="llama", show_default=True)
@click.option("--size", type=click.Choice(sorted(SIZES)), default="tiny", show_default=True)
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace the model files in a non-empty OUT_DIR.")
def make_tiny_model(out_dir: Path, arch: str, size: str, seed: int, overwrite: bool) -> None:
    """Write a random-weight ARCH model of SIZE to OUT_DIR (same arguments -> identical files)."""
    try:
        path = build_model(out_dir, arch, size, seed, overwrite=overwrite)
    except FileExistsError as exc:
        raise click.UsageError(str(exc)) from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="OUT_DIR") from None
    click.echo(f"{path} ({count_parameters(path):,} parameters, {arch}, {size}, seed {seed})")
