"""A 'GPU' compute stream over host memory, for tests of the stream-ordering rule (#11).

On CUDA, the engine's layer callback runs when the layer's kernels are queued: the KV bytes are
valid only once the stream ran them, which the layer's event says. ``FakeStream`` models exactly
that on CPU tensors: ``write(dst, values)`` queues the write and returns a ``FakeEvent`` (a
``ReadyToken``); the bytes land in ``dst`` only when the stream runs the write, in order, either
when the test calls ``run()`` (manual) or on the stream's own thread after a delay (``delay_s``: a
number, or a callable drawing one per write). A transport that reads ``dst`` before the event
completed reads stale bytes, as a NIC or copy engine would on a GPU.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import torch


class FakeEvent:
    """``torch.cuda.Event``'s ``query``/``synchronize`` over a threading.Event."""

    def __init__(self) -> None:
        self._done = threading.Event()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        self._done.wait()

    def complete(self) -> None:
        self._done.set()


class FakeStream:
    def __init__(self, *, delay_s: float | Callable[[], float] | None = None) -> None:
        self._delay_s = delay_s
        self._lock = threading.Condition()
        self._queue: deque[tuple[float, torch.Tensor, torch.Tensor, FakeEvent]] = deque()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        if delay_s is not None:
            self._thread = threading.Thread(target=self._loop, name="fake-stream", daemon=True)
            self._thread.start()

    def write(self, dst: torch.Tensor, values: torch.Tensor) -> FakeEvent:
        """Queue ``dst.copy_(values)`` (values are captured now, as a kernel's inputs would be)."""
        event = FakeEvent()
        delay = self._delay_s() if callable(self._delay_s) else float(self._delay_s or 0.0)
        with self._lock:
            due = max(time.monotonic() + delay, self._queue[-1][0] if self._queue else 0.0)
            self._queue.append((due, dst, values.clone(), event))
            self._lock.notify_all()
        return event

    def run(self) -> int:
        """Manual mode: run every queued write now, in order; returns how many ran."""
        count = 0
        while True:
            with self._lock:
                if not self._queue:
                    return count
                _, dst, values, event = self._queue.popleft()
            dst.copy_(values)
            event.complete()
            count += 1

    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._queue) + int(self._busy)

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and (not self._queue or self._queue[0][0] > time.monotonic()):
                    timeout = self._queue[0][0] - time.monotonic() if self._queue else None
                    self._lock.wait(timeout)
                if self._closed:
                    return
                _, dst, values, event = self._queue.popleft()
                self._busy = True
            dst.copy_(values)
            event.complete()
            with self._lock:
                self._busy = False
                self._lock.notify_all()
