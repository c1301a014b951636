"""Per-layer ready tokens: how the producer of KV tells a transport that a layer's writes are done.

On CUDA the engine's layer callback fires when layer L's kernels are *queued*, not when they ran.
The runner therefore records one ``torch.cuda.Event`` on the compute stream right after layer L and
passes it with the callback; a transport that reads the KV memory with DMA (RDMA WRITE, a copy on
another stream, a device-to-host staging copy) waits for that event first. On CPU the writes are
done when the callback runs, so the token is ``COMPLETED``.

A token is anything with ``query()`` (non-blocking: have the writes before it completed?) and
``synchronize()`` (block the calling thread until they have); ``torch.cuda.Event`` is one.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ReadyToken(Protocol):
    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class _Completed:
    """The token of memory that is valid already (CPU KV, or a caller that synchronised)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def __repr__(self) -> str:
        return "COMPLETED"


COMPLETED: ReadyToken = _Completed()


def record_layer_ready(device: torch.device) -> ReadyToken:
    """A token for everything queued so far on ``device``'s current stream (call right after the
    layer's KV writes were issued, on the thread that issued them)."""
    if device.type != "cuda":
        return COMPLETED
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record()
    return event
