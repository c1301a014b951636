"""Metric arithmetic on synthetic timings, with exact expected numbers."""

from __future__ import annotations

import math

import pytest

from splitwise.bench.metrics import SLO, Distribution, RequestResult, compute_metrics


def _ok(
    ttft_s: float,
    last_token_s: float,
    output_tokens: int,
    itl_s: list[float],
    e2e_s: float,
    prompt_tokens: int = 10,
) -> RequestResult:
    return RequestResult(
        success=True,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        ttft_s=ttft_s,
        itl_s=itl_s,
        last_token_s=last_token_s,
        e2e_s=e2e_s,
    )


def test_tpot_excludes_the_first_token() -> None:
    # 5 tokens: first at 1.0 s, last at 1.8 s -> 4 gaps of 0.2 s.
    assert _ok(1.0, 1.8, 5, [0.2] * 4, 1.9).tpot_s == pytest.approx(0.2)
    assert _ok(1.0, 1.0, 1, [], 1.1).tpot_s is None  # one token: no TPOT
    assert RequestResult(success=False, ttft_s=1.0, last_token_s=2.0, output_tokens=5).tpot_s is None


def test_distribution_uses_linear_percentiles() -> None:
    dist = Distribution.of_seconds([0.1, 0.2, 0.3, 0.4])  # ms: 100 200 300 400
    assert dist.count == 4
    assert dist.mean_ms == pytest.approx(250.0)
    assert dist.p50_ms == pytest.approx(250.0)
    assert dist.p90_ms == pytest.approx(370.0)  # 300 + 0.7 * 100
    assert dist.p99_ms == pytest.approx(397.0)  # 300 + 0.97 * 100
    assert dist.max_ms == pytest.approx(400.0)
    assert Distribution.of_seconds([]) == Distribution(0, None, None, None, None, None)


def test_compute_metrics_throughput_and_latencies() -> None:
    results = [
        _ok(0.5, 1.5, 11, [0.1] * 10, 1.6, prompt_tokens=100),  # TPOT 0.1
        _ok(1.0, 3.0, 5, [0.5] * 4, 3.2, prompt_tokens=50),  # TPOT 0.5
        RequestResult(success=False, prompt_tokens=7, error="HTTP 500: boom"),
    ]
    m = compute_metrics(results, duration_s=4.0, slo=SLO())
    assert (m.num_requests, m.num_completed, m.num_failed) == (3, 2, 1)
    assert m.total_prompt_tokens == 150  # failed requests are not counted
    assert m.total_output_tokens == 16
    assert m.request_throughput == pytest.approx(0.5)
    assert m.output_throughput == pytest.approx(4.0)
    assert m.ttft.mean_ms == pytest.approx(750.0)
    assert m.tpot.mean_ms == pytest.approx(300.0)
    assert m.tpot.p50_ms == pytest.approx(300.0)
    assert m.itl.count == 14  # ITL pools every gap of every request
    assert m.itl.mean_ms == pytest.approx((10 * 100 + 4 * 500) / 14)
    assert m.e2e.max_ms == pytest.approx(3200.0)
    assert m.slo_attainment is None and m.goodput is None and m.num_slo_met == 0


def test_slo_needs_both_objectives_and_counts_failures_as_misses() -> None:
    results = [
        _ok(0.5, 1.5, 11, [0.1] * 10, 1.6),  # TTFT 500 ms, TPOT 100 ms: meets both
        _ok(0.5, 5.5, 11, [0.5] * 10, 5.6),  # TPOT 500 ms: misses TPOT
        _ok(2.5, 3.5, 11, [0.1] * 10, 3.6),  # TTFT 2500 ms: misses TTFT
        _ok(0.2, 0.2, 1, [], 0.3),  # one token, no TPOT: meets (only TTFT is judged)
        RequestResult(success=False, error="timeout"),
    ]
    m = compute_metrics(results, duration_s=10.0, slo=SLO(ttft_ms=1000, tpot_ms=200))
    assert m.num_slo_met == 2
    assert m.slo_attainment == pytest.approx(2 / 5)
    assert m.goodput == pytest.approx(0.2)
    # Only a TTFT objective: the slow decoder now counts.
    only_ttft = compute_metrics(results, duration_s=10.0, slo=SLO(ttft_ms=1000))
    assert only_ttft.num_slo_met == 3


def test_slo_boundary_is_inclusive() -> None:
    exact = _ok(1.0, 2.0, 11, [0.1] * 10, 2.1)  # TTFT exactly 1000 ms, TPOT exactly 100 ms
    assert SLO(ttft_ms=1000, tpot_ms=100).is_met(exact)
    assert not SLO(ttft_ms=999.9, tpot_ms=100).is_met(exact)


@pytest.mark.parametrize(
    ("kwargs", "flag"), [({"ttft_ms": 0}, "--slo-ttft-ms"), ({"tpot_ms": -5}, "--slo-tpot-ms")]
)
def test_slo_rejects_non_positive_objectives(kwargs: dict[str, float], flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        SLO(**kwargs)


def test_compute_metrics_rejects_empty_duration() -> None:
    with pytest.raises(ValueError, match="duration"):
        compute_metrics([], duration_s=0.0, slo=SLO())


def test_result_to_dict_carries_tpot() -> None:
    out = _ok(1.0, 1.8, 5, [0.2] * 4, 1.9).to_dict()
    assert math.isclose(out["tpot_s"], 0.2)
    assert out["itl_s"] == [0.2] * 4 and out["success"] is True
