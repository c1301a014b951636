"""`splitwise bench engine`: the engine against transformers' generate() (and an older commit of
itself), prefill and decode tokens/s with the measured roofline, interleaved in one run."""

from __future__ import annotations

import dataclasses
import json

import click

from splitwise.commands.options import fail_on_value_error, resolve_model
from splitwise.errors import SplitwiseError


@click.command("engine")
@click.option("--model", default=None, help="Model directory (default: built-in small model).")
@click.option(
    "--batch", "batches", multiple=True, type=click.IntRange(min=1), default=(1, 8, 32), show_default=True
)
@click.option(
    "--prompt-len", default=128, show_default=True, type=click.IntRange(min=1), help="Prefill prompt length."
)
@click.option(
    "--context-len",
    "context_lens",
    multiple=True,
    type=click.IntRange(min=1),
    default=(512,),
    show_default=True,
    help="Tokens in context when decoding starts (repeat the flag: --context-len 512 --context-len 2048).",
)
@click.option("--decode-tokens", default=32, show_default=True, type=click.IntRange(min=3))
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N] (both systems).")
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    help="auto, float32, bfloat16 or float16 (both systems); auto: bfloat16 on a CPU with native bf16 "
    "(avx512_bf16/AMX) and on GPUs, else float32.",
)
@click.option(
    "--reference-dtype",
    default=None,
    help="dtype of the transformers reference (default: --dtype), e.g. bf16 engine vs fp32 generate().",
)
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--threads", default=None, type=click.IntRange(min=1), help="torch CPU threads (default: torch's)."
)
@click.option(
    "--baseline-commit",
    default=None,
    help="Also run the engine of this git commit (extracted at bench time), interleaved: before/after ratios.",
)
@click.option("--no-transformers", is_flag=True, help="Skip the transformers generate() reference.")
@click.option("--json", "as_json", is_flag=True)
def engine_cmd(
    model: str | None,
    batches: tuple[int, ...],
    prompt_len: int,
    context_lens: tuple[int, ...],
    decode_tokens: int,
    device: str,
    dtype: str,
    reference_dtype: str | None,
    repeats: int,
    threads: int | None,
    baseline_commit: str | None,
    no_transformers: bool,
    as_json: bool,
) -> None:
    """Prefill/decode tokens/s vs transformers generate() (and an older engine), interleaved,
    each figure next to the machine's roofline measured in the same run."""
    import torch

    from splitwise.bench.engine_bench import BenchSpec, run_engine_bench

    if not no_transformers:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise click.ClickException(
                "the engine benchmark needs transformers (pip install -e .[test]) or --no-transformers"
            ) from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device is available", param_hint="--device")
    if reference_dtype is not None and reference_dtype not in ("float32", "bfloat16", "float16"):
        raise click.BadParameter(
            f"{reference_dtype!r} is not float32, bfloat16 or float16", param_hint="--reference-dtype"
        )
    if threads is not None:
        torch.set_num_threads(threads)
    from splitwise.engine.cpu_dtype import resolve_dtype

    dtype = resolve_dtype(dtype, device)
    spec = BenchSpec(
        model_dir=resolve_model(model, default_size="small"),
        batches=list(batches),
        context_lens=list(context_lens),
        prompt_len=prompt_len,
        decode_tokens=decode_tokens,
        device=device,
        dtype=dtype,
        repeats=repeats,
        baseline_commit=baseline_commit,
        with_transformers=not no_transformers,
        reference_dtype=reference_dtype,
    )
    try:
        rows, limits = run_engine_bench(spec, progress=lambda line: click.echo(line, err=True))
    except ValueError as exc:
        raise fail_on_value_error(exc) from None
    except SplitwiseError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"limits": dataclasses.asdict(limits), "rows": rows}, indent=2))
        return
    click.echo(
        f"roofline ({limits.device}, {limits.dtype}; transformers in {reference_dtype or dtype}; measured in this run): memory "
        f"{limits.bandwidth_bytes_s / 1e9:.1f} GB/s (copy, read+write), matmul {limits.matmul_flops_s / 1e9:.0f} GFLOP/s"
    )
    click.echo(
        f"{'batch':>5} {'ctx':>5} {'system':>18} {'prefill tok/s':>14} {'(roof %)':>9} "
        f"{'decode tok/s':>13} {'(roof %)':>9}  ratios"
    )
    for r in rows:
        ratios = "  ".join(f"{k.removeprefix('x_')} {v:.2f}" for k, v in r.items() if k.startswith("x_"))
        click.echo(
            f"{r['batch']:>5} {r['context_len']:>5} {r['system']:>18} {r['prefill_tok_s']:>14.0f} "
            f"{100 * float(r['prefill_tok_s']) / float(r['prefill_roofline_tok_s']):>8.0f}% "
            f"{r['decode_tok_s']:>13.0f} {100 * float(r['decode_tok_s']) / float(r['decode_roofline_tok_s']):>8.0f}%  "
            f"{ratios}"
        )
