"""What one benchmark run measured, from per-request timings (plain data, no I/O).

Definitions (docs/benchmarks.md; the same as vLLM's ``bench serve`` and DistServe):

* **TTFT**: request sent -> first chunk carrying output text.
* **ITL**: every gap between consecutive chunks carrying output text, pooled over all requests.
  A chunk may carry several tokens (a server may batch them), so ITL is per chunk, as vLLM measures.
* **TPOT**: per request, (last text chunk - first text chunk) / (output tokens - 1): the first token is
  excluded. Requests with a single output token have no TPOT.
* **E2E latency**: request sent -> end of the response.
* **SLO attainment**: the share of *all* requests (failed ones count as misses) that met every SLO
  given; a request meets both ``--slo-ttft-ms`` and ``--slo-tpot-ms`` or it does not count.
* **Goodput**: requests per second that met every SLO (vLLM's ``--goodput``).

Percentiles are numpy's (linear interpolation), as in vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """One request as the client saw it. Times are seconds from the request's send, except
    ``sent_at_s``: when it was sent, seconds after the benchmark started."""

    success: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    last_token_s: float | None = None
    e2e_s: float | None = None
    error: str = ""
    sent_at_s: float = 0.0

    @property
    def tpot_s(self) -> float | None:
        if not self.success or self.ttft_s is None or self.last_token_s is None or self.output_tokens < 2:
            return None
        return (self.last_token_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tpot_s": self.tpot_s}


@dataclass(frozen=True)
class SLO:
    """Latency objectives in milliseconds; None means "not judged"."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None  # vLLM's --goodput e2el:MS

    def __post_init__(self) -> None:
        if self.ttft_ms is not None and self.ttft_ms <= 0:
            raise ValueError(f"--slo-ttft-ms: must be > 0, got {self.ttft_ms}")
        if self.tpot_ms is not None and self.tpot_ms <= 0:
            raise ValueError(f"--slo-tpot-ms: must be > 0, got {self.tpot_ms}")
        if self.e2el_ms is not None and self.e2el_ms <= 0:
            raise ValueError(f"--goodput: e2el must be > 0 ms, got {self.e2el_ms}")

    @property
    def is_set(self) -> bool:
        return self.ttft_ms is not None or self.tpot_ms is not None or self.e2el_ms is not None

    def is_met(self, result: RequestResult) -> bool:
        """Success and every SLO given met (a request without a TPOT meets the TPOT SLO)."""
        if not result.success:
            return False
        if self.ttft_ms is not None and (result.ttft_s is None or result.ttft_s * 1000 > self.ttft_ms):
            return False
        if self.e2el_ms is not None and (result.e2e_s is None or result.e2e_s * 1000 > self.e2el_ms):
            return False
        tpot = result.tpot_s
        return not (self.tpot_ms is not None and tpot is not None and tpot * 1000 > self.tpot_ms)


@dataclass(frozen=True)
class Distribution:
    """mean / p50 / p90 / p99 / max of one latency in milliseconds (all None when there are no samples)."""

    count: int
    mean_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None

    @classmethod
    def of_seconds(cls, values_s: Sequence[float]) -> Distribution:
        if not values_s:
            return cls(0, None, None, None, None, None)
        ms = np.asarray(values_s, dtype=np.float64) * 1000.0
        p50, p90, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
        return cls(len(ms), float(ms.mean()), p50, p90, p99, float(ms.max()))


@dataclass(frozen=True)
class BenchmarkMetrics:
    num_requests: int
    num_completed: int
    num_failed: int
    duration_s: float
    total_prompt_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens of completed requests / s
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    slo: SLO
    num_slo_met: int
    slo_attainment: float | None  # None when no SLO was given
    goodput: float | None  # requests / s meeting every SLO

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_metrics(results: Sequence[RequestResult], duration_s: float, slo: SLO) -> BenchmarkMetrics:
    """Aggregate per-request results of a run that took ``duration_s`` (first send -> last response)."""
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    done = [r for r in results if r.success]
    num_met = sum(1 for r in results if slo.is_met(r)) if slo.is_set else 0
    return BenchmarkMetrics(
        num_requests=len(results),
        num_completed=len(done),
        num_failed=len(results) - len(done),
        duration_s=duration_s,
        total_prompt_tokens=sum(r.prompt_tokens for r in done),
        total_output_tokens=sum(r.output_tokens for r in done),
        request_throughput=len(done) / duration_s,
        output_throughput=sum(r.output_tokens for r in done) / duration_s,
        ttft=Distribution.of_seconds([r.ttft_s for r in done if r.ttft_s is not None]),
        tpot=Distribution.of_seconds([t for r in done if (t := r.tpot_s) is not None]),
        itl=Distribution.of_seconds([gap for r in done for gap in r.itl_s]),
        e2e=Distribution.of_seconds([r.e2e_s for r in done if r.e2e_s is not None]),
        slo=slo,
        num_slo_met=num_met,
        slo_attainment=(num_met / len(results) if results else 0.0) if slo.is_set else None,
        goodput=num_met / duration_s if slo.is_set else None,
    )
