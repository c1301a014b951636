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
from splitwise.commands.bench_engine import engine_cmd
from splitwise.commands.options import fail_on_value_error as _fail_on_value_error
from splitwise.commands.options import resolve_model


@click.group("bench")
def bench() -> None:
    """Benchmarks (figures and ratios against a reference measured in the same run)."""


bench.add_command(engine_cmd)


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
