"""Host staging for the tcp transport when the KV cache is on a GPU (#11: "tcp from GPU memory").

A socket can only read and write host memory, so a GPU KV cache goes through a host buffer, one
per transport thread (sender threads on P, reader threads on D), grown on demand and pinned on
CUDA so the copies are DMA::

    P  ready token waited for (the ordering rule) -> gather: every run's K, then every run's V,
       device -> host on a side stream, that stream synchronised -> send the buffer
    D  receive the payload into the buffer -> scatter: host -> device into the blocks on a side
       stream, synchronised before the write counts as landed

The buffer layout is the wire layout (``tcp.py``), so P's gather is one send and D's receive one
``recv_into``. Only the transport's own side stream is synchronised, never the device. The same
class runs on CPU tensors (no stream, no pinning), which is how the tests exercise it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

from splitwise.engine.kv_cache import KIND_K, KIND_V, KVCache


class DeviceStage:
    def __init__(self, kv_cache: KVCache) -> None:
        self.kv_cache = kv_cache
        self.is_cuda = kv_cache.device.type == "cuda"
        self._local = threading.local()  # per thread: its host buffer and side stream

    def gather(self, layer: int, runs: list[list[int]]) -> memoryview:
        """The bytes of ``runs`` ([start, n] pairs) of ``layer``, K then V, in host memory."""
        views = list(self._block_views(layer, runs))
        total = sum(v.numel() * v.element_size() for v in views)
        buffer = self._buffer(total)
        offset = 0
        with self._stream() as stream:
            for view in views:
                nbytes = view.numel() * view.element_size()
                target = buffer[offset : offset + nbytes].view(view.dtype).view(view.shape)
                target.copy_(view, non_blocking=self.is_cuda)
                offset += nbytes
            if stream is not None:
                stream.synchronize()
        return memoryview(buffer[:total].numpy()).cast("B")  # type: ignore[arg-type]

    def receive_buffer(self, num_bytes: int) -> memoryview:
        return memoryview(self._buffer(num_bytes)[:num_bytes].numpy()).cast("B")  # type: ignore[arg-type]

    def scatter(self, layer: int, runs: list[list[int]]) -> None:
        """Copy what ``receive_buffer`` holds (wire layout) into ``runs`` of ``layer``."""
        buffer = self._local.buffer
        offset = 0
        with self._stream() as stream:
            for view in self._block_views(layer, runs):
                nbytes = view.numel() * view.element_size()
                view.copy_(
                    buffer[offset : offset + nbytes].view(view.dtype).view(view.shape),
                    non_blocking=self.is_cuda,
                )
                offset += nbytes
            if stream is not None:
                stream.synchronize()  # the blocks hold the bytes before D counts them as landed

    def _block_views(self, layer: int, runs: list[list[int]]) -> Iterator[torch.Tensor]:
        tensor = self.kv_cache.tensor
        for kind in (KIND_K, KIND_V):
            for start, n in runs:
                yield tensor[layer, kind, start : start + n]

    def _buffer(self, num_bytes: int) -> torch.Tensor:
        buffer: torch.Tensor | None = getattr(self._local, "buffer", None)
        if buffer is None or buffer.numel() < num_bytes:
            buffer = torch.empty(max(num_bytes, 1 << 20), dtype=torch.uint8, pin_memory=self.is_cuda)
            self._local.buffer = buffer
        return buffer

    @contextlib.contextmanager
    def _stream(self) -> Iterator[Any]:
        if not self.is_cuda:
            yield None
            return
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = torch.cuda.Stream(device=self.kv_cache.device)  # type: ignore[no-untyped-call]
            self._local.stream = stream
        with torch.cuda.stream(stream):
            yield stream
