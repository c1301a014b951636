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
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rdma import nics as nic_detection
from rdma.connection import QPPolicy
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
OPTION_TRAFFIC_CLASS = "rdma_traffic_class"
OPTION_SERVICE_LEVEL = "rdma_service_level"
# Environment names FastDeploy, NCCL and Mooncake users already set, read when the option is not
# given (first one set wins). The --rdma-* flags of `splitwise serve` fill the options.
ENV_FALLBACKS = {
    OPTION_GID_INDEX: ("KVCACHE_RDMA_GID_INDEX", "NCCL_IB_GID_INDEX", "MC_GID_INDEX"),
    OPTION_TRAFFIC_CLASS: ("KVCACHE_RDMA_TRAFFIC_CLASS", "NCCL_IB_TC"),
    OPTION_SERVICE_LEVEL: ("KVCACHE_RDMA_SERVICE_LEVEL", "NCCL_IB_SL"),
}
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


def choose_nics(
    kv_cache: KVCache, options: TransportOptions, env: Mapping[str, str] | None = None
) -> list[str]:
    """The NICs this KV cache's requests are striped over (one lane per NIC).

    CUDA: the NICs nearest the KV cache's GPU (``rdma.nics.nics_for_gpu``: ``rdma_nics`` or
    ``KVCACHE_RDMA_NICS`` entry for that GPU, ``CUDA_VISIBLE_DEVICES`` applied, ``a+b`` entries
    striped; else every NIC tied for nearest). CPU: every listed or active NIC."""
    environ = dict(os.environ if env is None else env)
    configured = options.extra.get(OPTION_NICS, "").strip()
    if configured:
        environ[nic_detection.ENV_NICS] = configured
    if kv_cache.device.type == "cuda":
        logical = cuda_device_index(kv_cache)
        return nic_detection.nics_for_gpu(logical, env=environ, pci_address=gpu_pci_address(logical))
    if environ.get(nic_detection.ENV_NICS, "").strip():
        entries = nic_detection.parse_nic_list(environ[nic_detection.ENV_NICS])
        names = [n for entry in entries for n in entry.split(nic_detection.STRIPE_SEPARATOR)]
        return list(dict.fromkeys(names))  # a gpu-mode list repeats NICs: each once
    return nic_detection.resolve_nics("cpu", env=environ)


def gpu_pci_address(logical: int) -> str | None:
    """The PCI address (0000:3b:00.0) of CUDA device ``logical`` when torch can tell it."""
    try:
        import torch

        props: Any = torch.cuda.get_device_properties(logical)  # pci_* fields: torch >= 2.x builds
        return f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    except (AttributeError, RuntimeError, AssertionError):
        return None


def int_option(options: TransportOptions, name: str, env: Mapping[str, str] | None = None) -> int | None:
    """``options.extra[name]``, else the first of its ENV_FALLBACKS that is set; None if neither."""
    environ = os.environ if env is None else env
    raw = options.extra.get(name, "").strip()
    source = name
    if not raw:
        for env_name in ENV_FALLBACKS.get(name, ()):
            if environ.get(env_name, "").strip():
                raw, source = environ[env_name].strip(), env_name
                break
    if not raw:
        return None
    try:
        return int(raw, 0)
    except ValueError:
        raise ValueError(f"{source}: {raw!r} is not an integer") from None


def qp_policy(options: TransportOptions, env: Mapping[str, str] | None = None) -> QPPolicy:
    """QP attributes from the options (traffic class, service level); defaults otherwise."""
    traffic_class = int_option(options, OPTION_TRAFFIC_CLASS, env)
    service_level = int_option(options, OPTION_SERVICE_LEVEL, env)
    return QPPolicy(
        traffic_class=traffic_class if traffic_class is not None else 0,
        service_level=service_level if service_level is not None else 0,
    )


def default_backend(options: TransportOptions) -> VerbsBackend:
    from rdma.pyverbs_backend import PyverbsBackend  # lazy: pyverbs is optional

    return PyverbsBackend(gid_index=int_option(options, OPTION_GID_INDEX))


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
    """The lowest-numbered ACTIVE port, whatever its number (a dual-port NIC may be cabled on 2)."""
    states = []
    for number in range(1, device.num_ports + 1):
        port = device.query_port(number)
        if port.is_active:
            return port
        states.append(f"{number}: down")
    raise VerbsCallError(
        f"no active port on {device.name} ({', '.join(states) or 'no ports'})", device=device.name
    )


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
