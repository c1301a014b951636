"""ipc and tcp between KV buffers of different tensor-parallel sizes whose head replicas differ
(a model with 1 KV head: TP=2 keeps one replica per rank). Real sockets and shared memory."""

from __future__ import annotations

import time

import pytest
import torch

from splitwise.engine.kv_cache import KVCache, default_shm_name
from splitwise.kv_geometry import KVGeometry
from splitwise.transfer.base import TransferState, TransportOptions, check_compatible
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


@pytest.mark.parametrize("protocol", ["ipc", "tcp"])
@pytest.mark.parametrize(("p_tp", "d_tp"), [(2, 1), (1, 2)])
def test_replicated_heads_land_at_every_destination_replica(protocol: str, p_tp: int, d_tp: int) -> None:
    p_kv, d_kv = filled(geometry(p_tp), 1, shm=False), filled(geometry(d_tp), 2, shm=protocol == "ipc")
    before = d_kv.tensor.clone()
    opts = dict(connect_timeout_s=5, cluster_token=TOKEN)
    target = create_target(protocol, TransportOptions(node_id="d", **opts))  # type: ignore[arg-type]
    initiator = create_initiator(protocol, TransportOptions(node_id="p", **opts))  # type: ignore[arg-type]
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
