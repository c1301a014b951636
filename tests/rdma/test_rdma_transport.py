"""The rdma Transport end to end over the fake verbs fabric (and over pyverbs when a device exists):
real TCP side channel, real threads, bytes compared exactly."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

import pytest
import torch

from rdma.fake import FakeBackend, FakeFabric
from rdma.testing import pyverbs_backend_or_skip
from rdma.transport import RdmaInitiator, RdmaTarget
from splitwise.engine.kv_cache import KVCache, KVCacheGeometry
from splitwise.transfer.base import TransportOptions
from splitwise.transfer.errors import NotConnectedError
from splitwise.transfer.registry import get_transport

GEOMETRY = KVCacheGeometry(
    num_layers=3, num_blocks=16, block_size=4, num_kv_heads=2, head_dim=8, dtype="float16"
)


def caches() -> tuple[KVCache, KVCache]:
    p_cache, d_cache = KVCache(GEOMETRY), KVCache(GEOMETRY)
    generator = torch.Generator().manual_seed(0)
    p_cache.as_bytes().copy_(
        torch.randint(0, 256, (GEOMETRY.total_bytes,), dtype=torch.uint8, generator=generator)
    )
    return p_cache, d_cache


Pair = tuple[RdmaInitiator, RdmaTarget, KVCache, KVCache, FakeFabric]


@pytest.fixture()
def pair() -> Iterator[Pair]:
    """P with two NICs (two striped lanes) and D with one, on one fake fabric."""
    fabric = FakeFabric().add_device("fake_d0").add_device("fake_p0").add_device("fake_p1")
    backend = FakeBackend(fabric)
    options = TransportOptions(
        cluster_token="test-cluster-token", host="127.0.0.1", port=0, connect_timeout_s=5
    )
    target = RdmaTarget(options, backend=backend, nics=["fake_d0"])
    initiator = RdmaInitiator(
        options, backend=backend, nics=["fake_p0", "fake_p1"], send_queue_depth=4, completion_timeout_s=5
    )
    p_cache, d_cache = caches()
    target.register(d_cache)
    initiator.register(p_cache)
    initiator.connect("d", target.endpoint())
    try:
        yield initiator, target, p_cache, d_cache, fabric
    finally:
        initiator.close()
        target.close()


def blocks(cache: KVCache, layer: int, kind: int, block_ids: list[int]) -> bytes:
    return b"".join(
        bytes(cache.tensor[layer, kind, b].contiguous().view(torch.uint8).numpy()) for b in block_ids
    )


def transfer(initiator: RdmaInitiator, req_id: str, src: list[int], dst: list[int]) -> None:
    for layer in range(GEOMETRY.num_layers):
        initiator.write_layer("d", req_id, layer, src, dst)
    initiator.finish("d", req_id)


def test_registry_knows_rdma() -> None:
    classes = get_transport("rdma")
    assert (classes.initiator, classes.target) == (RdmaInitiator, RdmaTarget)


def test_several_layers_land_byte_exact_in_the_expected_blocks(pair: Pair) -> None:
    initiator, target, p_cache, d_cache, _ = pair
    src, dst = [1, 2, 3, 9, 4], [5, 6, 7, 0, 12]  # runs (1->5 x3), (9->0), (4->12)
    target.expect("r1", dst, timeout_s=10)
    transfer(initiator, "r1", src, dst)
    assert initiator.wait("r1", 10).is_done
    assert target.poll("r1").is_done
    for layer in range(GEOMETRY.num_layers):
        for kind in (0, 1):
            assert blocks(d_cache, layer, kind, dst) == blocks(p_cache, layer, kind, src)
            untouched = [b for b in range(GEOMETRY.num_blocks) if b not in dst]
            assert blocks(d_cache, layer, kind, untouched) == bytes(len(untouched) * GEOMETRY.bytes_per_block)
    # 3 runs x 2 kinds x 3 layers = 18 WRITEs striped over two lanes, plus one notice per lane
    lanes = initiator._peers["d"].lanes
    assert sum(lane.num_wrs_posted for lane in lanes) == 18 + 2
    assert all(lane.num_wrs_posted > 1 for lane in lanes)


def test_back_to_back_requests_on_the_reused_connection(pair: Pair) -> None:
    initiator, target, p_cache, d_cache, _ = pair
    for i in range(4):
        src, dst = [i], [15 - i]
        target.expect(f"q{i}", dst)
        transfer(initiator, f"q{i}", src, dst)
    for i in range(4):
        assert initiator.wait(f"q{i}", 10).is_done and target.poll(f"q{i}").is_done
        assert blocks(d_cache, 2, 1, [15 - i]) == blocks(p_cache, 2, 1, [i])


def test_completion_error_fails_the_request_and_reconnect_recreates_the_qps(pair: Pair) -> None:
    initiator, target, p_cache, d_cache, _ = pair
    nic = target._nics[0]
    nic.device.deregister_memory(nic.kv)  # P's rkey is now invalid: REM_ACCESS_ERR
    target.expect("bad", [3])
    # The first WRITE's error may break the connection before the later layers are queued: those
    # write_layer calls then raise NotConnectedError (the contract), and the request is FAILED either way.
    with contextlib.suppress(NotConnectedError):
        transfer(initiator, "bad", [3], [3])
    status = initiator.wait("bad", 10)
    assert status.is_failed and "REM_ACCESS_ERR" in (status.reason or "")
    assert blocks(d_cache, 0, 0, [3]) == bytes(GEOMETRY.bytes_per_block)  # never success
    with pytest.raises(NotConnectedError):
        initiator.write_layer("d", "next", 0, [1], [1])

    from rdma.verbs import Access

    nic.kv = nic.device.register_memory(
        d_cache.base_address, GEOMETRY.total_bytes, Access.LOCAL_WRITE | Access.REMOTE_WRITE
    )
    old_qpns = [lane.conn.qp.qpn for lane in initiator._peers["d"].lanes]
    initiator.connect("d", target.endpoint())
    assert [lane.conn.qp.qpn for lane in initiator._peers["d"].lanes] != old_qpns
    target.expect("good", [3])
    transfer(initiator, "good", [3], [3])
    assert initiator.wait("good", 10).is_done and target.poll("good").is_done
    assert blocks(d_cache, 1, 1, [3]) == blocks(p_cache, 1, 1, [3])


def test_unexpected_and_timed_out_requests_fail(pair: Pair) -> None:
    initiator, target, *_ = pair
    target.expect("late", [1], timeout_s=0.01)
    time.sleep(0.05)
    assert target.poll("late").is_failed
    assert target.poll("never-expected").is_failed
    assert initiator.poll("unknown").is_failed


def test_closing_the_target_fails_pending_initiator_requests(pair: Pair) -> None:
    initiator, target, *_ = pair
    initiator.write_layer("d", "orphan", 0, [1], [1])  # never finished, never expected
    target.close()
    status = initiator.wait("orphan", 10)
    assert status.is_failed


@pytest.mark.rdma
def test_transport_over_pyverbs_loopback() -> None:
    """Same as the fake end-to-end test, on a real device (P and D share it: loopback)."""
    backend, name = pyverbs_backend_or_skip()
    options = TransportOptions(cluster_token="test-cluster-token", host="127.0.0.1", port=0)
    target, initiator = (
        RdmaTarget(options, backend=backend, nics=[name]),
        RdmaInitiator(options, backend=backend, nics=[name]),
    )
    p_cache, d_cache = caches()
    try:
        target.register(d_cache)
        initiator.register(p_cache)
        initiator.connect("d", target.endpoint())
        src, dst = [1, 2, 3, 9], [5, 6, 7, 0]
        target.expect("r1", dst, timeout_s=30)
        transfer(initiator, "r1", src, dst)
        assert initiator.wait("r1", 30).is_done and target.poll("r1").is_done
        for layer in range(GEOMETRY.num_layers):
            for kind in (0, 1):
                assert blocks(d_cache, layer, kind, dst) == blocks(p_cache, layer, kind, src)
    finally:
        initiator.close()
        target.close()


def test_caller_errors_raise_at_write_layer(pair: Pair) -> None:
    from splitwise.transfer.errors import InvalidBlockIdsError

    initiator, *_ = pair
    with pytest.raises(InvalidBlockIdsError):
        initiator.write_layer("d", "r", 0, [1], [GEOMETRY.num_blocks])  # outside D's cache
    with pytest.raises(InvalidBlockIdsError):
        initiator.write_layer("d", "r", 0, [1, 2], [3])
    with pytest.raises(NotConnectedError):
        initiator.write_layer("nobody", "r", 0, [1], [1])


def test_small_max_message_size_splits_blocks_and_still_lands_exactly() -> None:
    from rdma.fake import FakePort

    tiny = FakePort(max_msg_bytes=100)  # smaller than one 128-byte block
    other = dataclasses.replace(tiny, gid="0000:0000:0000:0000:0000:ffff:0a00:0009")
    fabric = FakeFabric().add_device("d0", tiny).add_device("p0", other)
    backend = FakeBackend(fabric)
    options = TransportOptions(
        cluster_token="test-cluster-token",
    )
    target = RdmaTarget(options, backend=backend, nics=["d0"])
    initiator = RdmaInitiator(options, backend=backend, nics=["p0"], send_queue_depth=8)
    p_cache, d_cache = caches()
    try:
        target.register(d_cache)
        initiator.register(p_cache)
        initiator.connect("d", target.endpoint())
        target.expect("r", [8, 9, 10])
        transfer(initiator, "r", [0, 1, 2], [8, 9, 10])
        assert initiator.wait("r", 10).is_done
        # one run of 3 x 128 bytes per kind and layer, in 100-byte pieces: 4 WRITEs each, 24 in all
        assert initiator._peers["d"].lanes[0].num_wrs_posted == 24 + 1
        for layer in range(GEOMETRY.num_layers):
            assert blocks(d_cache, layer, 1, [8, 9, 10]) == blocks(p_cache, layer, 1, [0, 1, 2])
    finally:
        initiator.close()
        target.close()


@pytest.mark.rdma
def test_revoke_over_pyverbs_loopback_stops_the_peers_writes() -> None:
    """On a real device: after D revokes P (its QPs to ERROR), P's WRITEs fail and nothing lands."""
    backend, name = pyverbs_backend_or_skip()
    options = TransportOptions(cluster_token="test-cluster-token", host="127.0.0.1", port=0, node_id="p")
    target, initiator = (
        RdmaTarget(options, backend=backend, nics=[name]),
        RdmaInitiator(options, backend=backend, nics=[name]),
    )
    p_cache, d_cache = caches()
    try:
        target.register(d_cache)
        initiator.register(p_cache)
        initiator.connect("d", target.endpoint())
        target.expect("r1", [5, 6], timeout_s=30)
        before = [
            blocks(d_cache, layer, kind, [5, 6]) for layer in range(GEOMETRY.num_layers) for kind in (0, 1)
        ]
        assert target.revoke("p")
        try:
            transfer(initiator, "r1", [1, 2], [5, 6])
        except NotConnectedError:
            pass
        assert not initiator.wait("r1", 30).is_done
        after = [
            blocks(d_cache, layer, kind, [5, 6]) for layer in range(GEOMETRY.num_layers) for kind in (0, 1)
        ]
        assert after == before
    finally:
        initiator.close()
        target.close()


def test_target_deadlines_use_the_injected_clock() -> None:
    """rdma's request table is splitwise.transfer.tracking's: its deadlines follow the clock given."""
    now = [100.0]
    fabric = FakeFabric().add_device("d0")
    target = RdmaTarget(
        TransportOptions(cluster_token="test-cluster-token"),
        backend=FakeBackend(fabric),
        nics=["d0"],
        clock=lambda: now[0],
    )
    _, d_cache = caches()
    try:
        target.register(d_cache)
        target.expect("r", [1, 2], timeout_s=5)
        now[0] += 4.9
        assert target.poll("r").state.value == "pending"
        now[0] += 0.2
        status = target.poll("r")
        assert status.is_failed and "timed out" in (status.reason or "")
        target.forget("r")
        assert "unknown request" in (target.poll("r").reason or "")
    finally:
        target.close()
