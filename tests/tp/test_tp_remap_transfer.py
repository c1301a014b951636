"""ipc, tcp and rdma (fake verbs fabric) between KV buffers of different tensor-parallel sizes whose head replicas differ
(a model with 1 KV head: TP=2 keeps one replica per rank). Real sockets and shared memory."""

from __future__ import annotations

import time

import pytest
import torch

from splitwise.engine.kv_cache import KVCache, default_shm_name
from splitwise.kv_geometry import KVGeometry
from splitwise.transfer.base import (
    TransferState,
    TransportInitiator,
    TransportOptions,
    TransportTarget,
    check_compatible,
)
from splitwise.transfer.errors import IncompatiblePeerError
from splitwise.transfer.registry import create_initiator, create_target

TOKEN = "tp-remap-token"


def geometry(tp: int, model_heads: int = 1) -> KVGeometry:
    physical = max(model_heads, tp)
    return KVGeometry(
        dtype="float32",
        block_size=4,
        num_layers=2,
        num_kv_heads=physical,
        head_dim=8,
        num_blocks=16,
        tp_size=tp,
        model_kv_heads=model_heads,
    )


def filled(geo: KVGeometry, seed: int, *, shm: bool) -> KVCache:
    kv = KVCache(geo, shm_name=default_shm_name("splitwise-tptest") if shm else None)
    kv.tensor.copy_(torch.randn(geo.shape, generator=torch.Generator().manual_seed(seed)))
    return kv


def transports(protocol: str, opts: dict[str, object]) -> tuple[TransportTarget, TransportInitiator]:
    """ipc/tcp from the registry; rdma over the fake verbs fabric (two NICs on P: striped lanes)."""
    if protocol != "rdma":
        target = create_target(protocol, TransportOptions(node_id="d", **opts))  # type: ignore[arg-type]
        return target, create_initiator(protocol, TransportOptions(node_id="p", **opts))  # type: ignore[arg-type]
    from rdma.fake import FakeBackend, FakeFabric
    from rdma.transport import RdmaInitiator, RdmaTarget

    backend = FakeBackend(FakeFabric().add_device("fake_d0").add_device("fake_p0").add_device("fake_p1"))
    options = TransportOptions(host="127.0.0.1", port=0, **opts)  # type: ignore[arg-type]
    return (
        RdmaTarget(options, backend=backend, nics=["fake_d0"]),
        RdmaInitiator(options, backend=backend, nics=["fake_p0", "fake_p1"], completion_timeout_s=5),
    )


@pytest.mark.parametrize("protocol", ["ipc", "tcp", "rdma"])
@pytest.mark.parametrize(("p_tp", "d_tp"), [(2, 1), (1, 2)])
def test_replicated_heads_land_at_every_destination_replica(protocol: str, p_tp: int, d_tp: int) -> None:
    p_kv, d_kv = filled(geometry(p_tp), 1, shm=False), filled(geometry(d_tp), 2, shm=protocol == "ipc")
    before = d_kv.tensor.clone()
    opts = dict(connect_timeout_s=5, cluster_token=TOKEN)
    target, initiator = transports(protocol, opts)
    try:
        target.register(d_kv)
        initiator.register(p_kv)
        initiator.connect("d", target.endpoint())
        src, dst = [3, 4, 5, 9], [10, 11, 12, 2]
        target.expect("r", dst, 10.0)
        for layer in range(2):
            initiator.write_layer("d", "r", layer, src, dst)
        initiator.finish("d", "r")
        assert initiator.wait("r", 10.0).state is TransferState.DONE
        deadline = time.monotonic() + 10
        while not target.poll("r").is_finished and time.monotonic() < deadline:
            time.sleep(0.01)  # D's reader thread records the finish; polling real I/O
        assert target.poll("r").is_done
    finally:
        initiator.close()
        target.close()
    expected = heads_of(before.clone())
    for replica in range(d_kv.geometry.num_kv_heads):
        expected[:, :, dst, replica] = heads_of(p_kv.tensor)[:, :, src, 0]  # P's first replica of head 0
    assert torch.equal(heads_of(d_kv.tensor), expected)
    d_kv.close()


def heads_of(tensor: torch.Tensor) -> torch.Tensor:
    """A cache's tensor as its bytes are laid out: head-major blocks [L, 2, blocks, H, bs, D]."""
    layers, kinds, blocks, block_size, heads, head_dim = tensor.shape
    return tensor.view(layers, kinds, blocks, heads, block_size, head_dim)


def test_a_transport_without_remap_refuses_different_replicas() -> None:
    check_compatible(geometry(2), geometry(2))
    check_compatible(geometry(2), geometry(1), head_remap=True)
    with pytest.raises(IncompatiblePeerError, match="head replicas"):
        check_compatible(geometry(2), geometry(1))
    with pytest.raises(IncompatiblePeerError, match="logical_kv_heads"):
        check_compatible(geometry(2, model_heads=1), geometry(2, model_heads=2), head_remap=True)


def test_rdma_remap_plan_writes_each_destination_head_from_its_source_head() -> None:
    from rdma.plan import WriteOp, plan_layer_remapped
    from splitwise.transfer.base import BlockRun

    one, two = geometry(1), geometry(2)  # 1 model head: TP=2 holds a replica per rank
    slab = 4 * 8 * 4  # block_size x head_dim x float32: one head of one block
    run = [BlockRun(src_start=3, dst_start=10, num_blocks=1)]
    v_one, v_two = one.region_offset(0, 1), two.region_offset(0, 1)
    # P tp=1 -> D tp=2: both replicas of block 10 from P's one head of block 3 (K, then V).
    assert plan_layer_remapped(one, two, 0, run, max_msg_bytes=1 << 20) == [
        WriteOp(3 * slab, 10 * 2 * slab, slab),
        WriteOp(3 * slab, 10 * 2 * slab + slab, slab),
        WriteOp(v_one + 3 * slab, v_two + 10 * 2 * slab, slab),
        WriteOp(v_one + 3 * slab, v_two + 10 * 2 * slab + slab, slab),
    ]
    # P tp=2 -> D tp=1: D's one head from P's first replica.
    assert plan_layer_remapped(two, one, 1, run, max_msg_bytes=1 << 20) == [
        WriteOp(two.block_offset(1, 0, 3), one.block_offset(1, 0, 10), slab),
        WriteOp(two.block_offset(1, 1, 3), one.block_offset(1, 1, 10), slab),
    ]
    # A head larger than the port's message size is split.
    assert len(plan_layer_remapped(two, one, 0, run, max_msg_bytes=slab // 2)) == 4
