"""`splitwise bench compare`: the same workload against N mixed instances and against P + D = N
disaggregated instances, on this machine, sweeping request rates.

    for each setup (mixed, disaggregated):
        start redis + instances (LocalCluster, --torch-threads each) -> warm up ->
        for each rate: run the workload (serve_bench.run_load) -> row
        stop the cluster
    -> markdown table + PNG plot + JSON with every run

Fairness: both setups get the same number of instances and the same torch threads per instance,
and at each rate exactly the same requests at the same arrival times (the workload seed is
``--seed`` + the rate's index, so rates never share prompts and no prefix-cache hit carries over).
The client sends requests round-robin over *every* instance's HTTP front end in both setups (the
Redis scheduler then places the work: least-loaded mixed node, or a prefill/decode pair), so the
front-end work (tokenising, detokenising, SSE) is spread the same way in both.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from splitwise.bench.dataset import SampleRequest
from splitwise.bench.metrics import SLO
from splitwise.bench.serve_bench import BenchmarkRun, LoadConfig, run_load, served_model_id
from splitwise.cluster import ClusterSpec, LocalCluster

SETUP_MIXED = "mixed"
SETUP_DISAGG = "disaggregated"
WARMUP_OUTPUT_TOKENS = 4

# Builds the workload of one rate: (number of requests, seed) -> requests.
WorkloadFactory = Callable[[int, int], list[SampleRequest]]


@dataclass(frozen=True)
class CompareConfig:
    request_rates: tuple[float, ...]
    num_prompts: int  # per rate
    num_mixed: int = 2
    num_prefill: int = 1
    num_decode: int = 1
    prefill_tp: int = 1  # tensor-parallel ranks of each P / D instance (#14); each rank gets torch_threads
    decode_tp: int = 1
    torch_threads: int = 1
    model: str | None = None
    transfer: str = "ipc"
    instance_args: tuple[str, ...] = ()
    seed: int = 0
    ignore_eos: bool = True
    request_timeout_s: float = 600.0
    slo: SLO = field(default_factory=SLO)
    output_dir: Path = Path("bench_results/compare")
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.request_rates:
            raise ValueError("--request-rates: give at least one rate")
        if any(not r > 0 or math.isinf(r) for r in self.request_rates):
            raise ValueError(
                f"--request-rates: every rate must be a finite number > 0, got {self.request_rates}"
            )
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts: must be at least 1, got {self.num_prompts}")
        if self.num_mixed < 1:
            raise ValueError(f"--mixed: must be at least 1, got {self.num_mixed}")
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError("--prefill/--decode: the disaggregated setup needs at least one of each")
        if self.num_prefill + self.num_decode != self.num_mixed:
            raise ValueError(
                f"--prefill/--decode: P + D ({self.num_prefill} + {self.num_decode}) must equal --mixed "
                f"({self.num_mixed}) so both setups get the same CPUs"
            )
        if self.prefill_tp < 1 or self.decode_tp < 1:
            raise ValueError("--prefill-tp/--decode-tp: tensor-parallel sizes must be >= 1")
        if self.torch_threads < 1:
            raise ValueError(f"--torch-threads: must be at least 1, got {self.torch_threads}")

    def spec(self, setup: str) -> ClusterSpec:
        is_mixed = setup == SETUP_MIXED
        return ClusterSpec(
            model=self.model,
            transfer=self.transfer,
            threads_per_instance=self.torch_threads,
            extra_args=list(self.instance_args),
            num_prefill=0 if is_mixed else self.num_prefill,
            num_decode=0 if is_mixed else self.num_decode,
            num_mixed=self.num_mixed if is_mixed else 0,
            prefill_tp=1 if is_mixed else self.prefill_tp,
            decode_tp=1 if is_mixed else self.decode_tp,
        )

    def label(self, setup: str) -> str:
        if setup == SETUP_MIXED:
            return f"{self.num_mixed} mixed"
        tp = (
            f" (tp {self.prefill_tp}/{self.decode_tp})" if (self.prefill_tp, self.decode_tp) != (1, 1) else ""
        )
        return f"{self.num_prefill}P{self.num_decode}D{tp}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "output_dir": str(self.output_dir)}


@dataclass(frozen=True)
class CompareRow:
    """One (setup, rate) point: the figures the table and the plot show."""

    setup: str
    label: str
    request_rate: float
    num_completed: int
    num_failed: int
    request_throughput: float
    output_throughput: float
    ttft_mean_ms: float | None
    ttft_p99_ms: float | None
    tpot_mean_ms: float | None
    tpot_p99_ms: float | None
    itl_p99_ms: float | None
    slo_attainment: float | None
    goodput: float | None

    @classmethod
    def of(cls, setup: str, label: str, rate: float, run: BenchmarkRun) -> CompareRow:
        m = run.metrics
        return cls(
            setup,
            label,
            rate,
            m.num_completed,
            m.num_failed,
            m.request_throughput,
            m.output_throughput,
            m.ttft.mean_ms,
            m.ttft.p99_ms,
            m.tpot.mean_ms,
            m.tpot.p99_ms,
            m.itl.p99_ms,
            m.slo_attainment,
            m.goodput,
        )


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[CompareRow]) -> str:
    header = (
        "| setup | rate (req/s) | done/failed | TTFT mean / p99 (ms) | TPOT mean / p99 (ms) | ITL p99 (ms) "
        "| SLO attainment | goodput (req/s) | output tok/s |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r.request_rate, r.setup)):
        attain = "-" if r.slo_attainment is None else f"{r.slo_attainment * 100:.0f}%"
        lines.append(
            f"| {r.label} | {r.request_rate:g} | {r.num_completed}/{r.num_failed} "
            f"| {_fmt(r.ttft_mean_ms)} / {_fmt(r.ttft_p99_ms)} | {_fmt(r.tpot_mean_ms)} / {_fmt(r.tpot_p99_ms)} "
            f"| {_fmt(r.itl_p99_ms)} | {attain} | {_fmt(r.goodput, '.2f')} | {_fmt(r.output_throughput, '.1f')} |"
        )
    return "\n".join(lines)


def _say(message: str) -> None:
    print(message, flush=True)  # noqa: T201 - the command's own progress lines


async def _sweep(
    config: CompareConfig,
    setup: str,
    base_urls: tuple[str, ...],
    workload: WorkloadFactory,
    warmup: list[SampleRequest],
) -> list[tuple[float, BenchmarkRun]]:
    model = await served_model_id(base_urls[0])

    def load(rate: float, seed: int, progress: bool) -> LoadConfig:
        return LoadConfig(
            base_urls=base_urls,
            model=model,
            request_rate=rate,
            seed=seed,
            ignore_eos=config.ignore_eos,
            request_timeout_s=config.request_timeout_s,
            slo=config.slo,
            show_progress=progress,
        )

    # One request per instance first: the first forward passes of a process pay one-off set-up costs.
    await run_load(load(math.inf, config.seed, False), warmup)
    runs = []
    for index, rate in enumerate(config.request_rates):
        seed = config.seed + index
        run = await run_load(load(rate, seed, config.show_progress), workload(config.num_prompts, seed))
        m = run.metrics
        _say(
            f"  {config.label(setup)} @ {rate:g} req/s: {m.num_completed}/{m.num_requests} done, "
            f"p99 TTFT {_fmt(m.ttft.p99_ms)} ms, p99 TPOT {_fmt(m.tpot.p99_ms)} ms, "
            f"SLO {_fmt(None if m.slo_attainment is None else m.slo_attainment * 100)}%"
        )
        runs.append((rate, run))
    return runs


def run_setup(
    config: CompareConfig, setup: str, workload: WorkloadFactory, warmup: WorkloadFactory
) -> tuple[list[CompareRow], dict[str, Any]]:
    """Start one setup's cluster, sweep every rate, stop it. Returns its rows and its full record."""
    log_dir = config.output_dir / "logs" / setup
    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(config.spec(setup), log_dir=log_dir)
    load_before = os.getloadavg()
    _say(
        f"{config.label(setup)}: starting redis + instances ({config.torch_threads} torch thread(s) each), "
        f"logs in {log_dir}"
    )
    try:
        cluster.start()
        cluster.wait_ready(timeout_s=300)
        base_urls = tuple(child.base_url for child in cluster.children)
        runs = asyncio.run(
            _sweep(config, setup, base_urls, workload, warmup(len(base_urls), config.seed - 1))
        )
    finally:
        cluster.stop()
    rows = [CompareRow.of(setup, config.label(setup), rate, run) for rate, run in runs]
    record = {
        "setup": setup,
        "label": config.label(setup),
        "base_urls": list(base_urls),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "runs": [run.to_dict() for _, run in runs],
    }
    return rows, record


def run_compare(
    config: CompareConfig, workload: WorkloadFactory, warmup: WorkloadFactory, plot_file: Path | None = None
) -> tuple[list[CompareRow], dict[str, Path]]:
    """Both setups, one after the other; writes compare.json, compare.md and the plot."""
    config.output_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    rows: list[CompareRow] = []
    records = []
    for setup in (SETUP_MIXED, SETUP_DISAGG):
        setup_rows, record = run_setup(config, setup, workload, warmup)
        rows += setup_rows
        records.append(record)
    files = {"json": config.output_dir / "compare.json", "table": config.output_dir / "compare.md"}
    files["json"].write_text(
        json.dumps(
            {
                "config": config.to_dict(),
                "started_unix_s": started,
                "wall_s": time.time() - started,
                "cpu_count": os.cpu_count(),
                "rows": [asdict(r) for r in rows],
                "setups": records,
            },
            indent=2,
        )
        + "\n"
    )
    files["table"].write_text(markdown_table(rows) + "\n")
    from splitwise.bench.plot import plot_compare  # matplotlib is imported only when plotting

    files["plot"] = plot_compare(rows, plot_file or config.output_dir / "compare.png", config.slo)
    return rows, files
