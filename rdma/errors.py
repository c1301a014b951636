"""Error root of the rdma package. Subclasses by cause; each carries the context that explains it.

``retryable`` says whether the same operation may succeed later with no change on our side: a
completion error on a queue pair is retryable (the QP is re-created and the request can fall back or
be retried), a missing device or a malformed peer message is not.
"""

from __future__ import annotations

from splitwise.transfer.errors import TransferError


class RdmaError(TransferError):
    """Root of every error the rdma package raises on purpose. It is a TransferError, so the
    process boundary that handles transfer failures handles RDMA ones with no special case."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        req_id: str | None = None,
        device: str | None = None,
        peer: str | None = None,
    ) -> None:
        super().__init__(message, req_id=req_id, peer=peer)
        self.device = device

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} (device={self.device})" if self.device else base


class NicDetectionError(RdmaError):
    """Topology detection found nothing usable: no active RDMA port, or (gpu mode) no GPU."""


class PyverbsUnavailableError(RdmaError):
    """pyverbs cannot be imported (not installed, or built against another rdma-core)."""


class NoRdmaDeviceError(RdmaError):
    """The verbs library sees no usable device: no kernel RDMA support, no device, or no active port."""


class InvalidConnectionInfoError(RdmaError):
    """A peer's connection message is malformed, of another schema version, or incompatible."""


class QueuePairStateError(RdmaError):
    """An operation was attempted in a QP state that does not allow it (e.g. post_send before RTS)."""


class VerbsCallError(RdmaError):
    """A verbs call failed synchronously (registration, QP creation or modify, post)."""

    def __init__(self, message: str, *, errno_code: int | None = None, **context: str | None) -> None:
        super().__init__(message, **context)
        self.errno_code = errno_code


class SendQueueFullError(VerbsCallError):
    """More work requests were posted than the send queue has free slots."""

    retryable = True


class CompletionError(RdmaError):
    """A work request completed with an error status. The QP is in ERROR: it must be re-created,
    and the transfer it carried did NOT happen (never treat this as success)."""

    retryable = True

    def __init__(self, message: str, *, status: str, wr_id: int, qpn: int, **context: str | None) -> None:
        super().__init__(message, **context)
        self.status = status
        self.wr_id = wr_id
        self.qpn = qpn


class CompletionTimeoutError(RdmaError):
    """No completion arrived within the deadline; the QP state is unknown, so it is re-created too."""

    retryable = True


class GpuMemoryError(RdmaError):
    """CUDA memory could not be prepared for RDMA (rdma.gpu_memory); the subclasses say why."""


class CudaUnavailableError(GpuMemoryError):
    """No CUDA driver binding loads: neither cuda-python (``cuda.bindings.driver``) nor libcuda.so.1."""


class CudaCallError(GpuMemoryError):
    """A CUDA driver call failed: ``call`` names it, ``result`` is the CUresult name, ``code`` its value."""

    def __init__(self, message: str, *, call: str, code: int, result: str, **context: str | None) -> None:
        super().__init__(message, **context)
        self.call = call
        self.code = code
        self.result = result


class DmaBufUnsupportedError(GpuMemoryError):
    """dma-buf cannot carry this GPU memory here: the device attribute says no, the driver refused the
    export, or the NIC/kernel refused ``ibv_reg_dmabuf_mr`` (EOPNOTSUPP/EINVAL). The registration
    policy may fall back to nvidia-peermem (rdma.resources)."""


class GpuRegistrationError(GpuMemoryError):
    """The GPU KV cache could not be registered by any allowed path; the message names each cause."""
