"""The CUDA driver half of the test double: GPU memory simulated with host buffers (see rdma.fake)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rdma.errors import CudaCallError
from rdma.gpu_memory import CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_NOT_FOUND

if TYPE_CHECKING:
    from rdma.fake import FakeFabric


class FakeCudaDriver:
    """A ``rdma.gpu_memory.CudaDriver`` over host buffers the test owns, announced as CUDA allocations
    with ``add_allocation``; its dma-buf fds are registered with the fabric for ``register_dmabuf``.

    ``dmabuf_supported`` is the device attribute; ``export_result`` a CUresult the export fails with.
    Like the real driver, the export takes only page-aligned ranges inside one allocation.
    """

    name = "fake-cuda"

    def __init__(
        self,
        fabric: FakeFabric,
        *,
        dmabuf_supported: bool = True,
        export_result: int | None = None,
        page_bytes: int = 4096,
    ) -> None:
        self.fabric = fabric
        self.dmabuf_supported_value = dmabuf_supported
        self.export_result = export_result
        self.page_bytes = page_bytes
        self.num_exports = 0

    def add_allocation(self, base: int, num_bytes: int) -> None:
        self.fabric.gpu_allocations.append((base, num_bytes))

    @staticmethod
    def _fail(call: str, code: int, result: str) -> CudaCallError:
        return CudaCallError(f"{call} failed: {result} ({code})", call=call, code=code, result=result)

    def address_range(self, device_index: int, ptr: int) -> tuple[int, int]:
        for base, size in self.fabric.gpu_allocations:
            if base <= ptr < base + size:
                return base, size
        raise self._fail("cuMemGetAddressRange", CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND")

    def dmabuf_supported(self, device_index: int) -> bool:
        return self.dmabuf_supported_value

    def export_dmabuf(self, device_index: int, base: int, size: int) -> int:
        if self.export_result is not None:
            raise self._fail(
                "cuMemGetHandleForAddressRange", self.export_result, f"CUresult {self.export_result}"
            )
        inside = any(b <= base and base + size <= b + s for b, s in self.fabric.gpu_allocations)
        if not inside or base % self.page_bytes or size % self.page_bytes:
            raise self._fail(
                "cuMemGetHandleForAddressRange", CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE"
            )
        self.num_exports += 1
        return self.fabric.export_dmabuf(base, size)

    def close_dmabuf(self, fd: int) -> None:
        self.fabric.close_dmabuf(fd)

    @property
    def num_open_fds(self) -> int:
        return len(self.fabric.dmabufs)
