"""Per-NIC resources both transport sides hold: the opened device, its port, and the KV cache
registered once (plus a small doorbell buffer for the completion notices).

Which NICs: ``TransportOptions.extra["rdma_nics"]`` (comma list), else ``KVCACHE_RDMA_NICS``, else
detection (``rdma.nics``): every active NIC for a CPU KV cache (striped), and for a CUDA KV cache
on GPU i the NIC listed at i (modulo the list length, FastDeploy's convention).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

from rdma import nics as nic_detection
from rdma.errors import VerbsCallError
from rdma.verbs import Access, MemoryRegion, PortInfo, VerbsBackend, VerbsDevice
from splitwise.engine.kv_cache import KVCache
from splitwise.transfer.base import TransportOptions

DOORBELL_BYTES = 64
OPTION_NICS = "rdma_nics"
OPTION_GID_INDEX = "rdma_gid_index"


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


@dataclass
class NicResources:
    device: VerbsDevice
    port: PortInfo
    kv: MemoryRegion
    doorbell: MemoryRegion
    doorbell_buffer: ctypes.Array[ctypes.c_char]

    def close(self) -> None:
        self.device.deregister_memory(self.kv)
        self.device.deregister_memory(self.doorbell)
        self.device.close()


def first_active_port(device: VerbsDevice) -> PortInfo:
    port = device.query_port(1)
    if not port.is_active:
        raise VerbsCallError(f"port 1 of {device.name} is not active", device=device.name)
    return port


def open_nics(backend: VerbsBackend, names: Sequence[str], kv_cache: KVCache, kv_access: Access) -> list[NicResources]:
    """Open every NIC and register the whole KV buffer on each (once per tensor, for the process
    lifetime). CUDA memory registers only where the driver allows it (nvidia-peermem); a failure
    names the cause instead of falling back silently."""
    opened: list[NicResources] = []
    try:
        for name in names:
            device = backend.open_device(name)
            port = first_active_port(device)
            try:
                kv = device.register_memory(kv_cache.base_address, kv_cache.geometry.total_bytes, kv_access)
            except VerbsCallError as exc:
                if kv_cache.device.type == "cuda":
                    raise VerbsCallError(
                        f"registering GPU KV memory failed ({exc}); GPU memory needs nvidia-peermem "
                        "(dma-buf registration is not implemented yet)", device=name,
                    ) from None
                raise
            buffer = ctypes.create_string_buffer(DOORBELL_BYTES)
            doorbell = device.register_memory(ctypes.addressof(buffer), DOORBELL_BYTES, Access.LOCAL_WRITE | Access.REMOTE_WRITE)
            opened.append(NicResources(device, port, kv, doorbell, buffer))
    except Exception:
        for nic in opened:
            nic.close()
        raise
    return opened
