"""Rolling TTFT / ITL p90 of the requests one node streams, for its LoadReport (the planner's SLO
signals).

Measured by the node runtime where it publishes tokens: TTFT from the work item's arrival on this
node to its first token chunk (on a decode node that covers P's queue, prefill and the KV transfer),
ITL as the gap between successive chunks divided by the chunk's tokens (as the HTTP layer counts
it). Only the last ``window_s`` seconds count, so the p90 follows a load that changes; the loop that
owns the requests calls it (one thread), and the heartbeat reads ``report()`` from the same loop's
snapshot.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 30.0
MAX_SAMPLES = 4096  # per kind: bounds memory and the percentile's cost under any load


@dataclass(frozen=True)
class LatencyReport:
    ttft_p90_ms: int
    itl_p90_ms: int
    samples: int  # requests with a first token inside the window


class RollingLatency:
    def __init__(self, *, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._ttft: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)  # (at, ms)
        self._itl: deque[tuple[float, float, int]] = deque(maxlen=MAX_SAMPLES)  # (at, ms per token, tokens)

    def first_token(self, ttft_s: float) -> None:
        self._ttft.append((self.clock(), ttft_s * 1000))

    def tokens(self, gap_s: float, count: int) -> None:
        if count > 0:
            self._itl.append((self.clock(), gap_s * 1000 / count, count))

    def report(self) -> LatencyReport:
        cutoff = self.clock() - self.window_s
        for samples in (self._ttft, self._itl):
            while samples and samples[0][0] < cutoff:
                samples.popleft()
        ttft = sorted(ms for _, ms in self._ttft)
        itl = sorted((ms, n) for _, ms, n in self._itl)
        return LatencyReport(
            ttft_p90_ms=round(ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))]) if ttft else 0,
            itl_p90_ms=round(_weighted_p90(itl)),
            samples=len(ttft),
        )


def _weighted_p90(sorted_pairs: list[tuple[float, int]]) -> float:
    """p90 of values each counted ``n`` times (a chunk of k tokens is k gaps)."""
    total = sum(n for _, n in sorted_pairs)
    if not total:
        return 0.0
    rank, seen = 0.9 * total, 0
    for value, n in sorted_pairs:
        seen += n
        if seen > rank:
            return value
    return sorted_pairs[-1][0]
