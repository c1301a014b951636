"""Endpoint: what a transport target publishes so an initiator can connect to it (torch-free: the
scheduler's node records and assignments carry it, as do D's PrefillTasks)."""

from __future__ import annotations

from dataclasses import dataclass

from splitwise.codes import Protocol
from splitwise.kv_geometry import KVGeometry


@dataclass(frozen=True)
class Endpoint:
    """In D's PrefillTask over the authenticated control channel, and in D's registry record. One
    typed record for every protocol (it crosses process boundaries through the codec); fields a
    protocol does not use keep their defaults."""

    protocol: Protocol
    host: str
    port: int
    geometry: KVGeometry
    access_key: str = ""  # tcp/ipc: only a peer handed this endpoint may write (XferHello checks it)
    schema: int = 0  # rdma: the side channel's schema version
    device: str = "cpu"  # ipc: where the KV cache lives ("cpu": shared memory, "cuda": CUDA IPC)
    shm_name: str = ""  # ipc on cpu: the /dev/shm segment of D's cache
    cuda_ipc_handle: bytes = b""  # ipc on cuda: the exported cudaMalloc block
    cuda_offset_bytes: int = 0  # ipc on cuda: the cache's offset inside that block
