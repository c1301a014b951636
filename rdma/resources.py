"""Per-NIC resources both transport sides hold: the opened device, its port, and the KV cache
registered once (plus a small doorbell buffer for the completion notices).

Which NICs: ``TransportOptions.extra["rdma_nics"]`` (comma list), else ``KVCACHE_RDMA_NICS``, else
detection (``rdma.nics``): every active NIC for a CPU KV cache (striped), and for a CUDA KV cache
on GPU i the NIC listed at i (modulo the list length, FastDeploy's convention).

How the KV cache is registered (``TransportOptions.extra["rdma_gpu_registration"]`` for CUDA):

    KV memory  mode               path                                   KV address peers write to
    CPU        -                  ibv_reg_mr                             VA of the tensor
    CUDA       auto (default)     dma-buf if supported, else peermem     IOVA (dma-buf) or VA (peermem)
    CUDA       dmabuf             dma-buf or GpuRegistrationError        IOVA = tensor's dma-buf offset
    CUDA       peermem            ibv_reg_mr on the CUDA pointer         VA of the tensor

"dma-buf supported" is decided at run time: the CUDA device attribute, the driver's export, and
the NIC accepting ibv_reg_dmabuf_mr (EOPNOTSUPP/EINVAL mean no). A fallback is logged and counted
(``gpu_dmabuf_fallbacks``). ``NicResources.kv_addr`` is where the KV tensor starts in its MR's
address space; D advertises it as ``TargetLane.kv_addr`` and P's lanes use theirs as the local
base, so both kinds of MR (and a mix of them on the two sides) address the same bytes.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from rdma import nics as nic_detection
from rdma.errors import (
    CudaUnavailableError,
    DmaBufUnsupportedError,
    GpuRegistrationError,
    VerbsCallError,
)
from rdma.gpu_memory import CudaDriver, export_dmabuf
from rdma.verbs import Access, MemoryRegion, PortInfo, VerbsBackend, VerbsDevice
from splitwise.engine.kv_cache import KVCache
from splitwise.transfer.base import TransferCounters, TransportOptions

log = logging.getLogger(__name__)

DOORBELL_BYTES = 64
OPTION_NICS = "rdma_nics"
OPTION_GID_INDEX = "rdma_gid_index"
OPTION_GPU_REGISTRATION = "rdma_gpu_registration"
# errno values with which ibv_reg_dmabuf_mr says "not on this NIC/kernel" rather than "failed".
DMABUF_UNSUPPORTED_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.EINVAL, errno.EPROTONOSUPPORT, errno.ENOSYS})


class KvMemory(enum.Enum):
    """How a NIC reaches the KV cache."""

    HOST = "host"  # ibv_reg_mr on CPU memory
    DMABUF = "dmabuf"  # ibv_reg_dmabuf_mr on the CUDA allocation's dma-buf (IOVA-addressed)
    PEERMEM = "peermem"  # ibv_reg_mr on the CUDA pointer (nvidia-peermem)


class GpuRegistration(enum.Enum):
    AUTO = "auto"
    DMABUF = "dmabuf"
    PEERMEM = "peermem"


@dataclass(frozen=True)
class GpuPolicy:
    """How to register a CUDA KV cache. ``cuda_driver`` None: load one (rdma.cuda_driver) on use."""

    mode: GpuRegistration = GpuRegistration.AUTO
    cuda_driver: CudaDriver | None = None

    @classmethod
    def from_options(cls, options: TransportOptions, cuda_driver: CudaDriver | None = None) -> GpuPolicy:
        value = options.extra.get(OPTION_GPU_REGISTRATION, GpuRegistration.AUTO.value).strip() or "auto"
        try:
            mode = GpuRegistration(value)
        except ValueError:
            choices = ", ".join(m.value for m in GpuRegistration)
            raise ValueError(f"{OPTION_GPU_REGISTRATION}: {value!r} is not one of {choices}") from None
        return cls(mode, cuda_driver)


def choose_nics(kv_cache: KVCache, options: TransportOptions) -> list[str]:
    configured = options.extra.get(OPTION_NICS, "").strip()
    if configured:
        names = nic_detection.parse_nic_list(configured)
    elif kv_cache.device.type == "cuda":
        names = nic_detection.resolve_nics("gpu")
    else:
        return nic_detection.resolve_nics("cpu")
    if kv_cache.device.type == "cuda":
        return [names[(kv_cache.device.index or 0) % len(names)]]
    return names


def default_backend(options: TransportOptions) -> VerbsBackend:
    from rdma.pyverbs_backend import PyverbsBackend  # lazy: pyverbs is optional

    gid_index = options.extra.get(OPTION_GID_INDEX)
    return PyverbsBackend(gid_index=int(gid_index) if gid_index else None)


@dataclass(frozen=True)
class KvRegion:
    mr: MemoryRegion
    addr: int  # where the KV tensor's first byte is in ``mr``'s address space
    memory: KvMemory


@dataclass
class NicResources:
    device: VerbsDevice
    port: PortInfo
    kv: MemoryRegion
    doorbell: MemoryRegion
    doorbell_buffer: ctypes.Array[ctypes.c_char]
    kv_addr: int  # the KV tensor's first byte in ``kv``'s address space (VA, or IOVA for dma-buf)
    kv_memory: KvMemory

    def close(self) -> None:
        self.device.deregister_memory(self.kv)
        self.device.deregister_memory(self.doorbell)
        self.device.close()


def first_active_port(device: VerbsDevice) -> PortInfo:
    port = device.query_port(1)
    if not port.is_active:
        raise VerbsCallError(f"port 1 of {device.name} is not active", device=device.name)
    return port


def open_nics(
    backend: VerbsBackend,
    names: Sequence[str],
    kv_cache: KVCache,
    kv_access: Access,
    *,
    gpu: GpuPolicy | None = None,
    counters: TransferCounters | None = None,
) -> list[NicResources]:
    """Open every NIC and register the whole KV buffer on each (once per tensor, for the process
    lifetime), as the module table says. Every failure names its cause; nothing falls back silently."""
    devices: list[VerbsDevice] = []
    try:
        for name in names:
            devices.append(backend.open_device(name))
        ports = [first_active_port(device) for device in devices]
        if kv_cache.device.type == "cuda":
            regions = register_gpu_kv(devices, kv_cache, kv_access, gpu or GpuPolicy(), counters)
        else:
            regions = [register_host_kv(device, kv_cache, kv_access) for device in devices]
        opened: list[NicResources] = []
        for device, port, region in zip(devices, ports, regions, strict=True):
            buffer = ctypes.create_string_buffer(DOORBELL_BYTES)
            doorbell = device.register_memory(
                ctypes.addressof(buffer), DOORBELL_BYTES, Access.LOCAL_WRITE | Access.REMOTE_WRITE
            )
            opened.append(NicResources(device, port, region.mr, doorbell, buffer, region.addr, region.memory))
    except Exception:
        for device in devices:
            device.close()  # closing a device releases its MRs too
        raise
    return opened


def register_host_kv(device: VerbsDevice, kv_cache: KVCache, access: Access) -> KvRegion:
    mr = device.register_memory(kv_cache.base_address, kv_cache.geometry.total_bytes, access)
    return KvRegion(mr, mr.addr, KvMemory.HOST)


def register_gpu_kv(
    devices: Sequence[VerbsDevice],
    kv_cache: KVCache,
    access: Access,
    policy: GpuPolicy,
    counters: TransferCounters | None,
) -> list[KvRegion]:
    """dma-buf first (unless the policy says peermem), then nvidia-peermem (unless it says dmabuf)."""
    dmabuf_reason = f"not tried ({OPTION_GPU_REGISTRATION}=peermem)"
    if policy.mode is not GpuRegistration.PEERMEM:
        try:
            return register_dmabuf_kv(devices, kv_cache, access, policy)
        except (DmaBufUnsupportedError, CudaUnavailableError) as exc:
            if policy.mode is GpuRegistration.DMABUF:
                raise GpuRegistrationError(
                    f"GPU KV cache: dma-buf registration is not possible ({cause(exc)}) and "
                    f"{OPTION_GPU_REGISTRATION}=dmabuf forbids the nvidia-peermem fallback"
                ) from None
            dmabuf_reason = cause(exc)
            log.warning(
                "GPU KV cache: dma-buf registration unavailable (%s); falling back to nvidia-peermem",
                dmabuf_reason,
            )
            if counters is not None:
                counters.inc("gpu_dmabuf_fallbacks")
    regions: list[KvRegion] = []
    for device in devices:
        try:
            mr = device.register_memory(kv_cache.base_address, kv_cache.geometry.total_bytes, access)
        except VerbsCallError as exc:
            raise GpuRegistrationError(
                f"GPU KV cache could not be registered: dma-buf: {dmabuf_reason}; nvidia-peermem: {cause(exc)} "
                "(is it loaded? lsmod | grep nvidia_peermem; modprobe nvidia-peermem)",
                device=device.name,
            ) from None
        regions.append(KvRegion(mr, mr.addr, KvMemory.PEERMEM))
    log.info("GPU KV cache registered through nvidia-peermem on %s", ", ".join(d.name for d in devices))
    return regions


def cause(exc: BaseException) -> str:
    """An error's own message, without the context suffix RdmaError adds (for nesting in another)."""
    return str(exc.args[0]) if exc.args else str(exc)


def cuda_device_index(kv_cache: KVCache) -> int:
    index = kv_cache.tensor.device.index  # a CUDA tensor always knows its device; "cuda" alone may not
    return index if index is not None else kv_cache.device.index or 0


def register_dmabuf_kv(
    devices: Sequence[VerbsDevice], kv_cache: KVCache, access: Access, policy: GpuPolicy
) -> list[KvRegion]:
    """Export the tensor's allocation once, register its pages on every NIC, close the fd (each MR
    holds the dma-buf). Raises DmaBufUnsupportedError when any step says "not here"."""
    if policy.cuda_driver is not None:
        driver = policy.cuda_driver
    else:
        from rdma.cuda_driver import load_cuda_driver  # lazy: CUDA bindings are optional

        driver = load_cuda_driver()
    export = export_dmabuf(
        driver, cuda_device_index(kv_cache), kv_cache.base_address, kv_cache.geometry.total_bytes
    )
    planned = export.range
    regions: list[KvRegion] = []
    try:
        for device in devices:
            try:
                mr = device.register_dmabuf(export.fd, planned.mr_offset, planned.mr_length, access)
            except VerbsCallError as exc:
                if exc.errno_code not in DMABUF_UNSUPPORTED_ERRNOS:
                    raise
                raise DmaBufUnsupportedError(f"{device.name} refused the dma-buf MR: {cause(exc)}") from None
            # The tensor sits (tensor_offset - mr_offset) bytes into the MR, whatever IOVA it got.
            regions.append(KvRegion(mr, mr.addr + planned.tensor_offset - planned.mr_offset, KvMemory.DMABUF))
    except Exception:
        for device, region in zip(devices, regions, strict=False):
            device.deregister_memory(region.mr)
        raise
    finally:
        driver.close_dmabuf(export.fd)
    log.info(
        "GPU KV cache registered through dma-buf (%s) on %s", driver.name, ", ".join(d.name for d in devices)
    )
    return regions
