"""In-process P/D transport pairs for every protocol (tcp, ipc over shared memory, rdma over the
fake verbs fabric): real sockets and threads, one process, so tests can drive timing with fakes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rdma.fake import FakeBackend, FakeFabric
from rdma.transport import RdmaInitiator, RdmaTarget
from splitwise.engine.kv_cache import KVCache, KVCacheGeometry, default_shm_name
from splitwise.transfer.base import TransportInitiator, TransportOptions, TransportTarget
from splitwise.transfer.registry import create_initiator, create_target
from splitwise.transfer.tcp_staging import DeviceStage

GEOMETRY = KVCacheGeometry(
    num_layers=3, num_blocks=24, block_size=4, num_kv_heads=2, head_dim=8, dtype="float16"
)
TOKEN = "test-cluster-token"
P_NODE = "prefill-test"
# "tcp-staged": tcp through the host staging a CUDA KV cache uses (tcp_staging.DeviceStage), run
# here on CPU tensors: the gather/scatter logic and the ordering rule, without a GPU.
PROTOCOLS = ["tcp", "tcp-staged", "ipc", "rdma"]


@dataclass
class Pair:
    protocol: str
    initiator: TransportInitiator
    target: TransportTarget
    p_kv: KVCache
    d_kv: KVCache
    fabric: FakeFabric | None

    def connect(self) -> None:
        self.initiator.connect("d", self.target.endpoint())

    # Bit patterns (int16 views), not float16 values: random bytes include NaNs, which never equal.
    def d_blocks(self, block_ids: list[int]) -> torch.Tensor:
        return self.d_kv.tensor[:, :, block_ids].clone().view(torch.int16)

    def p_blocks(self, block_ids: list[int]) -> torch.Tensor:
        return self.p_kv.tensor[:, :, block_ids].clone().view(torch.int16)


@contextmanager
def make_pair(
    protocol: str, *, dma_delay_s: float | Callable[[], float] | None = None, seed: int = 0
) -> Iterator[Pair]:
    generator = torch.Generator().manual_seed(seed)
    p_kv = KVCache(GEOMETRY)
    p_kv.as_bytes().copy_(
        torch.randint(0, 256, (GEOMETRY.total_bytes,), dtype=torch.uint8, generator=generator)
    )
    d_kv = KVCache(GEOMETRY, shm_name=default_shm_name("splitwise-test") if protocol == "ipc" else None)
    d_options = TransportOptions(connect_timeout_s=5, node_id="decode-test", cluster_token=TOKEN)
    p_options = TransportOptions(connect_timeout_s=5, node_id=P_NODE, cluster_token=TOKEN)
    fabric: FakeFabric | None = None
    target: TransportTarget
    initiator: TransportInitiator
    if protocol == "rdma":
        fabric = (
            FakeFabric(dma_delay_s=dma_delay_s)
            .add_device("fake_d0")
            .add_device("fake_p0")
            .add_device("fake_p1")
        )
        backend = FakeBackend(fabric)
        target = RdmaTarget(d_options, backend=backend, nics=["fake_d0"])
        initiator = RdmaInitiator(
            p_options,
            backend=backend,
            nics=["fake_p0", "fake_p1"],
            send_queue_depth=8,
            completion_timeout_s=5,
        )
    else:
        target = create_target(protocol.removesuffix("-staged"), d_options)
        initiator = create_initiator(protocol.removesuffix("-staged"), p_options)
    target.register(d_kv)
    initiator.register(p_kv)
    if protocol == "tcp-staged":
        target._stage = DeviceStage(d_kv)  # type: ignore[attr-defined]
        initiator._stage = DeviceStage(p_kv)  # type: ignore[attr-defined]
    pair = Pair(protocol, initiator, target, p_kv, d_kv, fabric)
    pair.connect()
    try:
        yield pair
    finally:
        initiator.close()
        target.close()
        d_kv.close()
