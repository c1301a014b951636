"""`splitwise bench ...`: benchmark scripts that print figures."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from splitwise.bench.goodput import GoodputCommand
from splitwise.bench.workload import build_workload
from splitwise.commands.options import resolve_model
from splitwise.errors import SplitwiseError


@click.group("bench")
def bench() -> None:
    """Benchmarks (figures and ratios against a reference measured in the same run)."""


@bench.command("engine")
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
        raise _fail_on_value_error(exc) from None
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


def _fail_on_value_error(exc: ValueError) -> click.ClickException:
    """A config error: BadParameter naming the flag when the message starts with one."""
    message = str(exc)
    if message.startswith("--"):
        flag, _, rest = message.partition(":")
        return click.BadParameter(rest.strip() or message, param_hint=flag)
    return click.ClickException(message)


def _rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number or 'inf'", param_hint="--request-rate") from None
    if not rate > 0:
        raise click.BadParameter(f"must be > 0 (or inf), got {value}", param_hint="--request-rate")
    return rate


def _workload_options(
    slo_ttft_ms: float | None, slo_tpot_ms: float | None
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Flags that describe the requests and their SLOs (shared by `serve` and `compare`)."""
    return lambda fn: _with_workload_options(fn, slo_ttft_ms, slo_tpot_ms)


def _with_workload_options(
    fn: Callable[..., None], slo_ttft_ms: float | None, slo_tpot_ms: float | None
) -> Callable[..., None]:
    for option in reversed(
        [
            click.option(
                "--tokenizer",
                default=None,
                help="Model directory whose tokenizer builds the prompts (default: the built-in small model).",
            ),
            click.option(
                "--random-input-len",
                default=1024,
                show_default=True,
                type=int,
                help="Prompt tokens (random dataset).",
            ),
            click.option(
                "--random-output-len",
                default=128,
                show_default=True,
                type=int,
                help="Output tokens (random dataset).",
            ),
            click.option(
                "--random-range-ratio",
                default=0.0,
                show_default=True,
                type=float,
                help="Lengths drawn uniformly from [L*(1-r), L*(1+r)].",
            ),
            click.option(
                "--seed",
                default=0,
                show_default=True,
                type=int,
                help="Seed of the prompts and the arrival times.",
            ),
            click.option(
                "--ignore-eos/--no-ignore-eos",
                default=True,
                show_default=True,
                help="Send ignore_eos: true so every request generates exactly its max_tokens.",
            ),
            click.option(
                "--slo-ttft-ms",
                default=slo_ttft_ms,
                show_default=True,
                type=float,
                help="TTFT objective (ms) for SLO attainment and goodput.",
            ),
            click.option(
                "--slo-tpot-ms",
                default=slo_tpot_ms,
                show_default=True,
                type=float,
                help="TPOT objective (ms) for SLO attainment and goodput.",
            ),
            click.option(
                "--goodput",
                multiple=True,
                metavar="KEY:MS",
                help="SLOs as vLLM spells them: --goodput ttft:500 tpot:50 (keys ttft, tpot, e2el); "
                "overrides --slo-ttft-ms/--slo-tpot-ms.",
            ),
            click.option(
                "--request-timeout",
                default=600.0,
                show_default=True,
                type=float,
                help="Seconds one request may take.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


@bench.command("serve", cls=GoodputCommand)
@click.option(
    "--base-url",
    "base_urls",
    multiple=True,
    default=("http://127.0.0.1:8000/v1",),
    show_default=True,
    help="Server root (http://host:port) or its OpenAI base URL (.../v1); repeat it to spread requests "
    "round-robin over several servers.",
)
@click.option(
    "--endpoint", type=click.Choice(["completions", "chat"]), default="completions", show_default=True
)
@click.option(
    "--model", default=None, help="Model id sent in requests (default: the first id of GET /models)."
)
@click.option(
    "--dataset-name",
    type=click.Choice(["random", "sharegpt", "multiturn"]),
    default="random",
    show_default=True,
    help="multiturn: conversations on 2P2D clusters it starts (splitwise/bench/multiturn.py).",
)
@click.option("--turns", default=6, show_default=True, type=int, help="multiturn: turns per conversation.")
@click.option(
    "--rounds",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="multiturn: rounds of every arm (fresh conversations each, the arms' order rotated).",
)
@click.option(
    "--arms-together/--arms-apart",
    default=False,
    show_default=True,
    help="multiturn: run a cluster's arms at once (routing under each other's load) or one at a time.",
)
@click.option(
    "--dataset-path",
    default=None,
    type=click.Path(dir_okay=False),
    help="ShareGPT-format JSON file (implies --dataset-name sharegpt).",
)
@click.option(
    "--sharegpt-output-len",
    default=None,
    type=int,
    help="Output tokens per ShareGPT request (default: the reply's length).",
)
@click.option("--num-prompts", default=100, show_default=True, type=int)
@click.option(
    "--request-rate", default="inf", show_default=True, help="Requests per second (Poisson arrivals), or inf."
)
@click.option("--max-concurrency", default=None, type=int, help="At most this many requests in flight.")
@_workload_options(slo_ttft_ms=None, slo_tpot_ms=None)
@click.option(
    "--result-file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write config, figures and every request's timings as JSON.",
)
@click.option(
    "--progress/--no-progress", default=True, show_default=True, help="Show a progress bar on stderr."
)
def serve_cmd(**opts: Any) -> None:
    """Load-test an OpenAI-compatible server: TTFT, TPOT, ITL, E2E, throughput, SLO attainment, goodput."""
    from splitwise.bench.serve_bench import format_report, run_load, served_model_id

    if opts["dataset_name"] == "multiturn":
        from splitwise.bench.multiturn import run_from_options

        return run_from_options(opts, click.echo)

    try:
        config = _load_config(
            opts,
            base_urls=tuple(opts["base_urls"]),
            model=opts["model"] or "",
            rate=_rate(opts["request_rate"]),
            max_concurrency=opts["max_concurrency"],
            progress=opts["progress"],
        )
        requests = build_workload(opts, num_prompts=opts["num_prompts"], seed=opts["seed"])
        if not config.model:
            config = dataclasses.replace(config, model=asyncio.run(served_model_id(config.base_urls[0])))
    except ValueError as exc:
        raise _fail_on_value_error(exc) from None
    run = asyncio.run(run_load(config, requests))
    click.echo(format_report(run))
    if opts["result_file"]:
        Path(opts["result_file"]).write_text(json.dumps(run.to_dict(), indent=2) + "\n")
        click.echo(f"results written to {opts['result_file']}")


def _slo(opts: dict[str, Any]) -> Any:
    from splitwise.bench.goodput import parse_goodput
    from splitwise.bench.metrics import SLO

    objectives = {"ttft_ms": opts["slo_ttft_ms"], "tpot_ms": opts["slo_tpot_ms"]}
    return SLO(**{**objectives, **parse_goodput(opts.get("goodput", ()))})


def _load_config(
    opts: dict[str, Any],
    *,
    base_urls: tuple[str, ...],
    model: str,
    rate: float,
    max_concurrency: int | None,
    progress: bool,
) -> Any:
    from splitwise.bench.serve_bench import LoadConfig

    return LoadConfig(
        base_urls=base_urls,
        endpoint=opts.get("endpoint", "completions"),
        model=model,
        request_rate=rate,
        max_concurrency=max_concurrency,
        seed=opts["seed"],
        ignore_eos=opts["ignore_eos"],
        request_timeout_s=opts["request_timeout"],
        slo=_slo(opts),
        show_progress=progress,
    )


# Default SLOs of `bench compare`, about 3x (TTFT) and 4x (TPOT) one request's unloaded latency with
# the default workload on one core: loose enough that a lightly loaded setup meets them.
COMPARE_SLO_TTFT_MS = 5000.0
COMPARE_SLO_TPOT_MS = 150.0


def _rates(value: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma list of numbers", param_hint="--request-rates"
        ) from None
    return rates


@bench.command("compare", cls=GoodputCommand)
@click.option(
    "--request-rates",
    default="0.25,0.5,0.75",
    show_default=True,
    help="Comma list of request rates (req/s) to sweep.",
)
@click.option("--num-prompts", default=16, show_default=True, type=int, help="Requests per rate.")
@click.option(
    "--mixed",
    "num_mixed",
    default=2,
    show_default=True,
    type=int,
    help="Mixed instances in the colocated setup.",
)
@click.option(
    "--prefill",
    "num_prefill",
    default=1,
    show_default=True,
    type=int,
    help="Prefill instances (P + D must equal --mixed).",
)
@click.option("--decode", "num_decode", default=1, show_default=True, type=int, help="Decode instances.")
@click.option(
    "--prefill-tp",
    default=1,
    show_default=True,
    type=int,
    help="Tensor-parallel ranks of each prefill instance (each rank uses --torch-threads: more CPUs).",
)
@click.option(
    "--decode-tp",
    default=1,
    show_default=True,
    type=int,
    help="Tensor-parallel ranks of each decode instance.",
)
@click.option(
    "--torch-threads", default=1, show_default=True, type=int, help="Torch CPU threads of every instance."
)
@click.option(
    "--model", default=None, help="Model directory the instances serve (default: the built-in small model)."
)
@click.option(
    "--transfer",
    type=click.Choice(["ipc", "tcp"]),
    default="ipc",
    show_default=True,
    help="KV transfer of the disaggregated setup.",
)
@click.option(
    "--instance-args",
    default="",
    help="Extra `splitwise serve` flags for every instance, e.g. '--max-num-batched-tokens 512'.",
)
@_workload_options(slo_ttft_ms=COMPARE_SLO_TTFT_MS, slo_tpot_ms=COMPARE_SLO_TPOT_MS)
@click.option(
    "--output-dir",
    default="bench_results/compare",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where compare.json, compare.md, compare.png and the instance logs go.",
)
@click.option(
    "--plot-file",
    default=None,
    type=click.Path(dir_okay=False),
    help="PNG path (default: OUTPUT_DIR/compare.png).",
)
@click.option("--progress/--no-progress", default=True, show_default=True)
def compare_cmd(**opts: Any) -> None:
    """N mixed instances vs P+D=N disaggregated ones on this machine, same workload, sweeping request rates.

    Default workload (docs/benchmarks.md says why): 1024-token random prompts with 128 output tokens
    on the built-in small model, 16 requests per rate, one torch thread per instance, SLO TTFT <= 5 s
    and TPOT <= 150 ms (about 3x and 4x one request's unloaded latency on one core)."""
    import shlex

    from splitwise.bench.compare import CompareConfig, markdown_table, run_compare

    opts = {**opts, "endpoint": "completions", "tokenizer": opts["tokenizer"] or opts["model"]}
    try:
        config = CompareConfig(
            request_rates=_rates(opts["request_rates"]),
            num_prompts=opts["num_prompts"],
            num_mixed=opts["num_mixed"],
            num_prefill=opts["num_prefill"],
            num_decode=opts["num_decode"],
            prefill_tp=opts["prefill_tp"],
            decode_tp=opts["decode_tp"],
            torch_threads=opts["torch_threads"],
            model=str(resolve_model(opts["model"], default_size="small")),
            transfer=opts["transfer"],
            instance_args=tuple(shlex.split(opts["instance_args"])),
            seed=opts["seed"],
            ignore_eos=opts["ignore_eos"],
            request_timeout_s=opts["request_timeout"],
            slo=_slo(opts),
            output_dir=Path(opts["output_dir"]),
            show_progress=opts["progress"],
        )
        build_workload(opts, num_prompts=1, seed=0)  # bad workload flags fail before any process starts
    except ValueError as exc:
        raise _fail_on_value_error(exc) from None

    def workload(num_prompts: int, seed: int) -> list[Any]:
        return build_workload(opts, num_prompts=num_prompts, seed=seed)

    def warmup(num_prompts: int, seed: int) -> list[Any]:
        return build_workload(
            {**opts, "random_output_len": 4, "random_range_ratio": 0.0}, num_prompts=num_prompts, seed=seed
        )

    rows, files = run_compare(
        config, workload, warmup, Path(opts["plot_file"]) if opts["plot_file"] else None
    )
    click.echo(markdown_table(rows))
    for kind, path in files.items():
        click.echo(f"{kind}: {path}")
