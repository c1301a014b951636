"""The real ``CudaDriver``s (rdma.gpu_memory): cuda-python if importable, else libcuda.so.1 via ctypes.

cupy is not an option: ``cupy.cuda.driver`` wraps neither cuMemGetAddressRange nor
cuMemGetHandleForAddressRange. Every call runs with the device's primary context pushed (the one
PyTorch uses), so it works from any thread, whether or not that thread has touched CUDA yet.

    binding                        import                               driver symbols
    cuda-python 12.x / 13.x        cuda.bindings.driver (12: cuda.cuda)  cu* with tuple returns
    ctypes                         libcuda.so.1                          cu*_v2 where cuda.h maps to _v2
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator
from typing import Any

from rdma.errors import CudaCallError, CudaUnavailableError, DmaBufUnsupportedError
from rdma.gpu_memory import CudaDriver

CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED = 124
CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD = 1


def load_cuda_driver() -> CudaDriver:
    """cuda-python, else ctypes on libcuda.so.1; CudaUnavailableError naming both attempts."""
    try:
        return CudaPythonDriver()
    except ImportError as exc:
        python_error = str(exc)
    try:
        return CtypesCudaDriver()
    except OSError as exc:
        raise CudaUnavailableError(
            f"no CUDA driver binding: cuda-python is not importable ({python_error}; pip install cuda-python) "
            f"and libcuda.so.1 does not load ({exc})"
        ) from None


class CudaPythonDriver:
    name = "cuda-python"

    def __init__(self) -> None:
        try:
            from cuda.bindings import driver  # cuda-python >= 12.6 (the only layout in 13)
        except ImportError:
            from cuda import cuda as driver  # cuda-python 12.0 - 12.5
        self.cu: Any = driver
        self._check("cuInit", self.cu.cuInit(0))

    def _check(self, call: str, result: tuple[Any, ...]) -> tuple[Any, ...]:
        err = result[0]
        if int(err) != 0:
            _, name = self.cu.cuGetErrorName(err)
            result_name = name.decode() if isinstance(name, bytes) else str(err)
            raise CudaCallError(
                f"{call} failed: {result_name} ({int(err)})", call=call, code=int(err), result=result_name
            )
        return result[1:]

    @contextlib.contextmanager
    def _context(self, device_index: int) -> Iterator[None]:
        (device,) = self._check("cuDeviceGet", self.cu.cuDeviceGet(device_index))
        (ctx,) = self._check("cuDevicePrimaryCtxRetain", self.cu.cuDevicePrimaryCtxRetain(device))
        try:
            self._check("cuCtxPushCurrent", self.cu.cuCtxPushCurrent(ctx))
            try:
                yield
            finally:
                self.cu.cuCtxPopCurrent()
        finally:
            self.cu.cuDevicePrimaryCtxRelease(device)

    def address_range(self, device_index: int, ptr: int) -> tuple[int, int]:
        with self._context(device_index):
            base, size = self._check("cuMemGetAddressRange", self.cu.cuMemGetAddressRange(ptr))
        return int(base), int(size)

    def dmabuf_supported(self, device_index: int) -> bool:
        attribute = self.cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED
        (device,) = self._check("cuDeviceGet", self.cu.cuDeviceGet(device_index))
        (value,) = self._check("cuDeviceGetAttribute", self.cu.cuDeviceGetAttribute(attribute, device))
        return bool(value)

    def export_dmabuf(self, device_index: int, base: int, size: int) -> int:
        export = getattr(self.cu, "cuMemGetHandleForAddressRange", None)
        if export is None:
            raise DmaBufUnsupportedError(
                "this cuda-python has no cuMemGetHandleForAddressRange (CUDA >= 11.7)"
            )
        handle_type = self.cu.CUmemRangeHandleType.CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD
        with self._context(device_index):
            (fd,) = self._check("cuMemGetHandleForAddressRange", export(base, size, handle_type, 0))
        return int(fd)

    def close_dmabuf(self, fd: int) -> None:
        os.close(fd)


class CtypesCudaDriver:
    """The same four calls straight from libcuda.so.1 (present wherever the NVIDIA driver is)."""

    name = "libcuda (ctypes)"

    def __init__(self, library: str = "libcuda.so.1") -> None:
        self.lib = ctypes.CDLL(library)
        self._call("cuInit", ctypes.c_uint(0))

    def _call(self, name: str, *args: Any) -> None:
        try:
            fn: Callable[..., int] = getattr(self.lib, name)
        except AttributeError:
            raise DmaBufUnsupportedError(f"libcuda has no {name}: the NVIDIA driver is too old") from None
        code = int(fn(*args))
        if code != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorName(ctypes.c_int(code), ctypes.byref(text))
            result = text.value.decode() if text.value else f"CUresult {code}"
            raise CudaCallError(f"{name} failed: {result} ({code})", call=name, code=code, result=result)

    @contextlib.contextmanager
    def _context(self, device_index: int) -> Iterator[None]:
        device, ctx = ctypes.c_int(), ctypes.c_void_p()
        self._call("cuDeviceGet", ctypes.byref(device), ctypes.c_int(device_index))
        self._call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), device)
        try:
            self._call("cuCtxPushCurrent_v2", ctx)
            try:
                yield
            finally:
                self.lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        finally:
            self.lib.cuDevicePrimaryCtxRelease_v2(device)

    def address_range(self, device_index: int, ptr: int) -> tuple[int, int]:
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        with self._context(device_index):
            self._call(
                "cuMemGetAddressRange_v2", ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)
            )
        return int(base.value), int(size.value)

    def dmabuf_supported(self, device_index: int) -> bool:
        device, value = ctypes.c_int(), ctypes.c_int()
        self._call("cuDeviceGet", ctypes.byref(device), ctypes.c_int(device_index))
        self._call(
            "cuDeviceGetAttribute",
            ctypes.byref(value),
            ctypes.c_int(CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED),
            device,
        )
        return bool(value.value)

    def export_dmabuf(self, device_index: int, base: int, size: int) -> int:
        fd = ctypes.c_int(-1)  # for DMA_BUF_FD the handle is an int
        with self._context(device_index):
            self._call(
                "cuMemGetHandleForAddressRange",
                ctypes.byref(fd),
                ctypes.c_uint64(base),
                ctypes.c_size_t(size),
                ctypes.c_int(CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD),
                ctypes.c_ulonglong(0),
            )
        return int(fd.value)

    def close_dmabuf(self, fd: int) -> None:
        os.close(fd)
