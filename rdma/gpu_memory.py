"""GPU memory for GPUDirect RDMA: a CUDA tensor's allocation exported as a dma-buf, and the arithmetic.

Why the whole allocation: PyTorch's caching allocator packs tensors into larger cudaMalloc
segments, and cuMemGetHandleForAddressRange exports page-aligned ranges of one allocation. So we
find the allocation with cuMemGetAddressRange, export all of it, and register only the pages that
hold the tensor (the peer can reach nothing else)::

    VA        base ....... ptr ===== tensor ===== ptr+nbytes ....... base+alloc_bytes
    dma-buf   0 .......... ptr-base ............. ptr-base+nbytes .. alloc_bytes
    MR             [mr_offset = page_down(ptr-base)  ..  page_up(ptr-base+nbytes) = mr_offset+mr_length]
    IOVA      pyverbs' DmaBufMR registers with iova = dma-buf offset, so byte k of the tensor is at
              IOVA tensor_offset + k (tensor_offset = ptr - base), for local SGEs and for the
              peer's remote_addr alike; a plain MR (host memory, nvidia-peermem) is at VA ptr + k.

Steps, and what each failure is (all RdmaError subclasses):

    driver.address_range(ptr)        CudaCallError (not device memory, no context, ...)
    driver.dmabuf_supported(dev)     False -> DmaBufUnsupportedError (the caller may use nvidia-peermem)
    base, alloc_bytes page-aligned?  no    -> DmaBufUnsupportedError
    driver.export_dmabuf(base, n)    CUDA_ERROR_NOT_SUPPORTED / CUDA_ERROR_INVALID_VALUE
                                           -> DmaBufUnsupportedError; any other CUresult -> CudaCallError

The CUDA calls sit behind ``CudaDriver`` (real ones in rdma.cuda_driver, a fake in rdma.fake) so
this decision logic is tested on machines without a GPU.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Protocol

from rdma.errors import CudaCallError, DmaBufUnsupportedError, GpuMemoryError

# CUresult values this module decides on (cuda.h).
CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_NOT_FOUND = 500
CUDA_ERROR_NOT_SUPPORTED = 801
EXPORT_UNSUPPORTED_RESULTS = frozenset({CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_NOT_SUPPORTED})

PAGE_BYTES = mmap.PAGESIZE


class CudaDriver(Protocol):
    """The four CUDA driver calls GPU registration needs. Each real call runs with the device's
    primary context current and raises CudaCallError (or DmaBufUnsupportedError where the driver
    lacks the feature); none blocks on GPU work."""

    name: str

    def address_range(self, device_index: int, ptr: int) -> tuple[int, int]:
        """(base, size) of the allocation holding ``ptr``: cuMemGetAddressRange."""
        ...

    def dmabuf_supported(self, device_index: int) -> bool:
        """cuDeviceGetAttribute(CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED)."""
        ...

    def export_dmabuf(self, device_index: int, base: int, size: int) -> int:
        """A dma-buf fd for [base, base+size): cuMemGetHandleForAddressRange(DMA_BUF_FD, flags 0).
        The caller owns the fd and closes it with ``close_dmabuf``."""
        ...

    def close_dmabuf(self, fd: int) -> None:
        """Close an exported fd. Safe once every NIC registered it: each MR holds the dma-buf."""
        ...


@dataclass(frozen=True)
class DmaBufRange:
    """Where a tensor sits in its allocation's dma-buf, and which page-aligned part to register."""

    alloc_base: int  # VA of the allocation's first byte (dma-buf offset 0)
    alloc_bytes: int
    mr_offset: int  # dma-buf offset to register from: page-aligned, <= tensor_offset
    mr_length: int  # page-aligned bytes to register (clipped to the allocation's end)
    tensor_offset: int  # dma-buf offset (= pyverbs IOVA) of the tensor's first byte


@dataclass(frozen=True)
class DmaBufExport:
    """An exported dma-buf fd and the range of it that holds the tensor."""

    fd: int
    range: DmaBufRange


def page_down(value: int, page_bytes: int) -> int:
    return value - value % page_bytes


def page_up(value: int, page_bytes: int) -> int:
    return page_down(value + page_bytes - 1, page_bytes)


def plan_dmabuf_range(
    ptr: int, nbytes: int, alloc_base: int, alloc_bytes: int, *, page_bytes: int = PAGE_BYTES
) -> DmaBufRange:
    """The arithmetic of the module table. Raises GpuMemoryError when the tensor is not inside the
    allocation (a wrong pointer), DmaBufUnsupportedError when the allocation is not page-aligned
    (the driver exports only page-aligned ranges)."""
    if nbytes <= 0:
        raise GpuMemoryError(f"cannot register an empty tensor ({nbytes} bytes at {ptr:#x})")
    if not (alloc_base <= ptr and ptr + nbytes <= alloc_base + alloc_bytes):
        raise GpuMemoryError(
            f"tensor [{ptr:#x}, +{nbytes}) is not inside its allocation [{alloc_base:#x}, +{alloc_bytes})"
        )
    if alloc_base % page_bytes or alloc_bytes % page_bytes:
        raise DmaBufUnsupportedError(
            f"allocation [{alloc_base:#x}, +{alloc_bytes}) is not aligned to the {page_bytes}-byte page; "
            "cuMemGetHandleForAddressRange exports only page-aligned ranges"
        )
    tensor_offset = ptr - alloc_base
    mr_offset = page_down(tensor_offset, page_bytes)
    mr_end = min(page_up(tensor_offset + nbytes, page_bytes), alloc_bytes)
    return DmaBufRange(alloc_base, alloc_bytes, mr_offset, mr_end - mr_offset, tensor_offset)


def export_dmabuf(
    driver: CudaDriver, device_index: int, ptr: int, nbytes: int, *, page_bytes: int = PAGE_BYTES
) -> DmaBufExport:
    """Export the allocation holding the tensor [ptr, ptr+nbytes) on CUDA device ``device_index``."""
    if not driver.dmabuf_supported(device_index):
        raise DmaBufUnsupportedError(
            f"CUDA device {device_index} reports CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED = 0 "
            "(needs the NVIDIA open kernel modules and a dma-buf capable kernel)"
        )
    alloc_base, alloc_bytes = driver.address_range(device_index, ptr)
    planned = plan_dmabuf_range(ptr, nbytes, alloc_base, alloc_bytes, page_bytes=page_bytes)
    try:
        fd = driver.export_dmabuf(device_index, alloc_base, alloc_bytes)
    except CudaCallError as exc:
        if exc.code in EXPORT_UNSUPPORTED_RESULTS:
            raise DmaBufUnsupportedError(f"the CUDA driver refused the dma-buf export: {exc}") from None
        raise
    return DmaBufExport(fd, planned)
