"""The fake fabric's delayed DMA engine (see rdma.fake): executes posted WRs later, in order per QP."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from rdma.verbs import WorkRequest

if TYPE_CHECKING:
    from rdma.fake import FakeQueuePair


class FakeDmaEngine:
    """One thread runs each QP's WRs in post order, each no earlier than post time + delay, and
    reads the source bytes then (``FakeQueuePair.run_deferred``)."""

    def __init__(self, lock: threading.RLock, delay_s: float | Callable[[], float] | None) -> None:
        self.lock = lock
        self.delay_s = delay_s
        self._queue: list[tuple[float, int, FakeQueuePair, WorkRequest]] = []
        self._seq = itertools.count()
        self._busy = 0
        self._changed = threading.Condition(lock)
        self._running = threading.Event()
        self._running.set()
        self._thread: threading.Thread | None = None

    def schedule(self, qp: FakeQueuePair, wr: WorkRequest) -> None:
        """Queue ``wr`` (caller holds the fabric lock)."""
        delay = self.delay_s() if callable(self.delay_s) else float(self.delay_s or 0.0)
        due = max(time.monotonic() + delay, qp.last_due)
        qp.last_due = due
        heapq.heappush(self._queue, (due, next(self._seq), qp, wr))
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="fake-dma", daemon=True)
            self._thread.start()
        self._changed.notify_all()

    def _loop(self) -> None:
        while True:
            self._running.wait()
            with self.lock:
                if not self._queue:
                    self._changed.wait(0.05)
                    continue
                due = self._queue[0][0]
                now = time.monotonic()
                if due > now:
                    self._changed.wait(due - now)
                    continue
                _, _, qp, wr = heapq.heappop(self._queue)
                self._busy += 1
            try:
                qp.run_deferred(wr)  # takes the fabric lock itself (an RLock)
            finally:
                with self.lock:
                    self._busy -= 1
                    self._changed.notify_all()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()
        with self.lock:
            self._changed.notify_all()

    @property
    def num_in_flight(self) -> int:
        with self.lock:
            return len(self._queue) + self._busy

    def wait_idle(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True
