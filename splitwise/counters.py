"""Named event counters: the one counter type of every package (transfer, instance, scheduler, rdma).

``inc`` from any thread (transport I/O threads count too); ``snapshot`` is what /metrics exports
(``ApiMetrics.add_counters_source``) and what tests and ``splitwise inspect`` read.
"""

from __future__ import annotations

import threading
from collections import Counter


class Counters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def inc(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def get(self, name: str) -> int:
        with self._lock:
            return self._counts[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)
