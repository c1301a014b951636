"""`splitwise bench serve`: an open-loop load generator for any OpenAI-compatible server.

    build workload -> arrival schedule -> send each request at its time (at most --max-concurrency
    in flight) -> gather per-request results -> metrics -> report / result file

Requests arrive as a Poisson process at ``--request-rate`` (exponential gaps drawn from ``--seed``),
or all at once for ``inf``; the schedule does not wait for responses (open loop), so a server that
falls behind builds a queue and its TTFT shows it. With several base URLs the requests go to them
round-robin, client side (``bench compare`` uses this to spread load over N mixed instances).
One shared ``httpx.AsyncClient`` carries every request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from splitwise.bench.client import ENDPOINT_PATHS, RequestOptions, send_request
from splitwise.bench.dataset import SampleRequest
from splitwise.bench.metrics import SLO, BenchmarkMetrics, RequestResult, compute_metrics


def api_base_url(url: str) -> str:
    """The OpenAI base URL (``.../v1``) of what a user passes as --base-url: the server root as vLLM's
    and SGLang's benchmarks take it (``http://host:port``), the base URL itself, or an endpoint URL."""
    url = url.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        url = url.removesuffix(suffix)
    return url if url.endswith("/v1") else url + "/v1"


@dataclass(frozen=True)
class LoadConfig:
    """How a workload is sent. Validated here; errors name the flag."""

    base_urls: tuple[str, ...]
    endpoint: str = "completions"
    model: str = ""
    request_rate: float = math.inf  # requests per second; inf sends everything at t=0
    max_concurrency: int | None = None
    seed: int = 0
    ignore_eos: bool = True
    request_timeout_s: float = 600.0
    slo: SLO = field(default_factory=SLO)
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.base_urls:
            raise ValueError("--base-url: at least one URL is needed")
        for url in self.base_urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"--base-url: {url!r} must start with http:// or https://")
        object.__setattr__(self, "base_urls", tuple(api_base_url(u) for u in self.base_urls))
        if self.endpoint not in ENDPOINT_PATHS:
            raise ValueError(f"--endpoint: {self.endpoint!r} is not one of {', '.join(ENDPOINT_PATHS)}")
        if not self.request_rate > 0:  # also rejects NaN
            raise ValueError(f"--request-rate: must be > 0 (or inf), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency: must be at least 1, got {self.max_concurrency}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"--request-timeout: must be > 0, got {self.request_timeout_s}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["request_rate"] = "inf" if math.isinf(self.request_rate) else self.request_rate
        return out


def arrival_offsets_s(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Send time of each request, seconds after the start: Poisson arrivals (exponential gaps with
    mean 1/rate, the first request at 0), or all 0 for an infinite rate."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for i in range(num_requests):
        if i > 0:
            now += rng.expovariate(request_rate)
        offsets.append(now)
    return offsets


@dataclass(frozen=True)
class BenchmarkRun:
    config: LoadConfig
    requests: list[SampleRequest]
    results: list[RequestResult]
    metrics: BenchmarkMetrics

    def to_dict(self) -> dict[str, Any]:
        """Everything, for --result-file: config, figures and every request's timings."""
        return {
            "config": self.config.to_dict(),
            "metrics": self.metrics.to_dict(),
            "requests": [
                {
                    "requested_prompt_tokens": s.prompt_tokens,
                    "requested_output_tokens": s.output_tokens,
                    **r.to_dict(),
                }
                for s, r in zip(self.requests, self.results, strict=True)
            ],
        }


class _Progress:
    """A tqdm bar on stderr when asked for and available; otherwise nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # the bench extra is not installed: run without a bar
                return
            self._bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)

    def advance(self, failed: bool) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if failed:
                self._bar.set_postfix_str("failures!", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _quiet_httpx() -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns the bar


async def run_load(config: LoadConfig, requests: list[SampleRequest]) -> BenchmarkRun:
    """Send ``requests`` per ``config`` and measure them (see the module doc)."""
    if not requests:
        raise ValueError("--num-prompts: the workload is empty")
    _quiet_httpx()
    offsets = arrival_offsets_s(len(requests), config.request_rate, config.seed)
    options = RequestOptions(endpoint=config.endpoint, model=config.model, ignore_eos=config.ignore_eos)
    limit = config.max_concurrency or len(requests)
    gate = asyncio.Semaphore(limit)
    progress = _Progress(len(requests), config.show_progress)
    timeout = httpx.Timeout(config.request_timeout_s, connect=30.0)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)

    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        start = time.perf_counter()

        async def one(i: int) -> RequestResult:
            await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
            async with gate:
                base_url = config.base_urls[i % len(config.base_urls)]
                sent_at_s = time.perf_counter() - start
                result = await send_request(client, base_url, requests[i], options)
            result.sent_at_s = sent_at_s
            progress.advance(not result.success)
            return result

        try:
            results = list(await asyncio.gather(*(one(i) for i in range(len(requests)))))
        finally:
            progress.close()
        duration_s = time.perf_counter() - start
    return BenchmarkRun(config, requests, results, compute_metrics(results, duration_s, config.slo))


async def served_model_id(base_url: str, timeout_s: float = 30.0) -> str:
    """The first model id of GET {base_url}/models (what --model defaults to)."""
    _quiet_httpx()
    async with httpx.AsyncClient(timeout=timeout_s, trust_env=False) as client:
        try:
            response = await client.get(base_url.rstrip("/") + "/models")
            response.raise_for_status()
            models = response.json().get("data") or []
        except (httpx.HTTPError, ValueError) as exc:
            raise ValueError(
                f"--base-url: cannot list models at {base_url}/models ({exc}); pass --model"
            ) from None
    if not models or not isinstance(models[0], dict) or "id" not in models[0]:
        raise ValueError(f"--base-url: {base_url}/models lists no model; pass --model")
    return str(models[0]["id"])


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_report(run: BenchmarkRun) -> str:
    """The human-readable summary printed after a run."""
    m, c = run.metrics, run.config
    rate = "inf" if math.isinf(c.request_rate) else f"{c.request_rate:g}"
    lines = [
        f"{'=' * 18} Serving Benchmark Result {'=' * 18}",
        f"{'Endpoint / rate (req/s)':<36}{c.endpoint} / {rate}",
        f"{'Successful / failed requests':<36}{m.num_completed} / {m.num_failed}",
        f"{'Benchmark duration (s)':<36}{m.duration_s:.2f}",
        f"{'Total input / generated tokens':<36}{m.total_prompt_tokens} / {m.total_output_tokens}",
        f"{'Request throughput (req/s)':<36}{m.request_throughput:.3f}",
        f"{'Output token throughput (tok/s)':<36}{m.output_throughput:.2f}",
    ]
    if m.slo_attainment is not None and m.goodput is not None:
        slo = f"TTFT<={_ms(m.slo.ttft_ms)} ms, TPOT<={_ms(m.slo.tpot_ms)} ms"
        lines += [
            f"{'SLO':<36}{slo}",
            f"{'SLO attainment':<36}{m.slo_attainment * 100:.1f}% ({m.num_slo_met}/{m.num_requests})",
            f"{'Goodput (req/s)':<36}{m.goodput:.3f}",
        ]
    lines.append(f"{'latency (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}")
    for name, dist in (("TTFT", m.ttft), ("TPOT", m.tpot), ("ITL", m.itl), ("E2E", m.e2e)):
        cells = "".join(
            f"{_ms(v):>10}" for v in (dist.mean_ms, dist.p50_ms, dist.p90_ms, dist.p99_ms, dist.max_ms)
        )
        lines.append(f"{name:<14}{cells}")
    errors = sorted({r.error for r in run.results if r.error})
    if errors:
        lines.append(f"errors ({m.num_failed}): " + "; ".join(errors[:3]))
    lines.append("=" * 62)
    return "\n".join(lines)
