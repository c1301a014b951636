"""`splitwise bench ...`: benchmark scripts that print figures."""

from __future__ import annotations

import json

import click

from splitwise.commands.options import resolve_model


@click.group("bench")
def bench() -> None:
    """Benchmarks (figures and ratios against a reference measured in the same run)."""


@bench.command("engine")
@click.option("--model", default=None, help="Model directory (default: built-in tiny model).")
@click.option("--batch", "batches", multiple=True, type=click.IntRange(min=1), default=(1, 8, 32), show_default=True)
@click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--decode-prompt-len", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--decode-tokens", default=64, show_default=True, type=click.IntRange(min=2))
@click.option("--json", "as_json", is_flag=True)
def engine_cmd(model: str | None, batches: tuple[int, ...], prompt_len: int, decode_prompt_len: int, decode_tokens: int, as_json: bool) -> None:
    """Prefill/decode tokens/s at several batch sizes vs transformers generate() on the same weights."""
    from splitwise.bench.engine_bench import run_engine_bench

    try:
        import transformers  # noqa: F401
    except ImportError:
        raise click.ClickException("the engine benchmark needs transformers (pip install -e .[test])") from None
    rows = run_engine_bench(resolve_model(model), list(batches), prompt_len, decode_prompt_len, decode_tokens)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'batch':>5} {'system':>13} {'prefill tok/s':>14} {'decode tok/s':>13} {'x prefill':>10} {'x decode':>9}")
    for r in rows:
        ratios = (
            f"{r['ratio_prefill']:>10.2f} {r['ratio_decode']:>9.2f}" if "ratio_prefill" in r else f"{'':>10} {'':>9}"
        )
        click.echo(f"{r['batch']:>5} {r['system']:>13} {r['prefill_tok_s']:>14.0f} {r['decode_tok_s']:>13.0f} {ratios}")
