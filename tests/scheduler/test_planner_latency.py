"""The rolling TTFT / ITL p90 a node reports for the planner."""

from __future__ import annotations

from splitwise.planner.latency import LatencyReport, RollingLatency


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_p90_of_first_tokens_and_token_weighted_gaps() -> None:
    clock = Clock()
    lat = RollingLatency(window_s=30, clock=clock)
    assert lat.report() == LatencyReport(0, 0, 0)
    for ms in range(1, 11):  # 1..10 ms
        lat.first_token(ms / 1000)
    lat.tokens(0.010, 1)  # 10 ms
    lat.tokens(0.400, 8)  # 8 gaps of 50 ms
    lat.tokens(0.1, 1)  # 100 ms: 1 of 10 gaps, above the p90
    lat.tokens(0.5, 0)  # no tokens: ignored
    assert lat.report() == LatencyReport(ttft_p90_ms=10, itl_p90_ms=100, samples=10)
    lat.tokens(0.010, 10)  # 10 more gaps of 10 ms: 20 in all, the 18th is 50 ms
    assert lat.report().itl_p90_ms == 50


def test_samples_older_than_the_window_age_out() -> None:
    clock = Clock()
    lat = RollingLatency(window_s=30, clock=clock)
    lat.first_token(2.0)
    lat.tokens(0.2, 1)
    clock.now += 20
    lat.first_token(0.1)
    assert lat.report() == LatencyReport(ttft_p90_ms=2000, itl_p90_ms=200, samples=2)
    clock.now += 15  # the first samples are 35 s old now
    assert lat.report() == LatencyReport(ttft_p90_ms=100, itl_p90_ms=0, samples=1)
