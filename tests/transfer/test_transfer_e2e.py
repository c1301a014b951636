"""ipc and tcp end to end: P and D in different processes, bytes compared exactly."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from transfer_peer import GEOMETRY, initial_kv, make_cache

from splitwise.engine.kv_cache import KVCache
from splitwise.transfer import TransferState, TransferStatus, create_initiator, create_target
from splitwise.transfer.base import TransportInitiator, TransportOptions, TransportTarget
from splitwise.transfer.errors import IncompatiblePeerError, InvalidBlockIdsError

PROTOCOLS = ["ipc", "tcp"]
P_SEED, D_SEED = 2, 1


@pytest.fixture()
def local_p(request: pytest.FixtureRequest) -> Iterator[tuple[TransportInitiator, KVCache]]:
    kv = make_cache(GEOMETRY, P_SEED, shared=False)
    initiator = create_initiator(request.param)
    initiator.register(kv)
    yield initiator, kv
    initiator.close()


@pytest.fixture()
def local_d(request: pytest.FixtureRequest) -> Iterator[tuple[TransportTarget, KVCache]]:
    kv = make_cache(GEOMETRY, D_SEED, shared=(request.param == "ipc"))
    target = create_target(request.param, TransportOptions())
    target.register(kv)
    yield target, kv
    target.close()
    kv.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def status_of(reply: dict[str, object]) -> TransferState:
    return TransferState(reply["state"])


@pytest.mark.parametrize("local_p", PROTOCOLS, indirect=True)
def test_every_layer_lands_exactly_and_nothing_else_changes(spawn_peer, local_p) -> None:  # type: ignore[no-untyped-def]
    initiator, p_kv = local_p
    d = spawn_peer("target", initiator.protocol, seed=D_SEED)
    initiator.connect("d0", d.endpoint)
    # r1 mixes runs (3..6 -> 20..23 contiguous on both sides) with scattered pairs; r2 shares
    # the connection and interleaves with r1 layer by layer.
    requests = {
        "r1": ([3, 4, 5, 6, 11, 0, 30], [20, 21, 22, 23, 2, 9, 31]),
        "r2": ([7, 8, 9], [12, 13, 5]),
    }
    headroom = {"r1": [24], "r2": [14]}  # reserved by D but never written
    for req_id, (_, dst) in requests.items():
        assert d.ask(op="expect", req_id=req_id, blocks=dst + headroom[req_id])["ok"]
    for layer in range(GEOMETRY.num_layers):
        for req_id, (src, dst) in requests.items():
            initiator.write_layer("d0", req_id, layer, src, dst)
    for req_id in requests:
        initiator.finish("d0", req_id)

    for req_id in requests:
        assert initiator.wait(req_id, 10.0) == TransferStatus(TransferState.DONE)
        assert status_of(d.ask(op="wait", req_id=req_id, timeout_s=10.0)) is TransferState.DONE

    expected = initial_kv(GEOMETRY, D_SEED)
    for src, dst in requests.values():
        expected[:, :, dst] = p_kv.tensor[:, :, src]
    landed = d.kv()
    assert torch.equal(landed, expected)  # every destination block exact, every other block untouched
    assert not torch.equal(landed[:, :, 20], initial_kv(GEOMETRY, D_SEED)[:, :, 20])


@pytest.mark.parametrize("local_p", PROTOCOLS, indirect=True)
def test_write_to_unreserved_block_fails_both_sides_and_lands_nowhere(spawn_peer, local_p) -> None:  # type: ignore[no-untyped-def]
    initiator, _ = local_p
    d = spawn_peer("target", initiator.protocol, seed=D_SEED)
    initiator.connect("d0", d.endpoint)
    d.ask(op="expect", req_id="r", blocks=[1, 2])
    initiator.write_layer("d0", "r", 0, [5, 6], [2, 3])  # block 3 was not reserved
    initiator.finish("d0", "r")

    p_status = initiator.wait("r", 10.0)
    assert p_status.state is TransferState.FAILED and "not reserved" in (p_status.reason or "")
    d_status = d.ask(op="wait", req_id="r", timeout_s=10.0)
    assert status_of(d_status) is TransferState.FAILED, d_status
    assert torch.equal(d.kv(), initial_kv(GEOMETRY, D_SEED))


@pytest.mark.parametrize("local_p", PROTOCOLS, indirect=True)
def test_refused_write_layer_fails_the_request_on_both_sides(spawn_peer, local_p) -> None:  # type: ignore[no-untyped-def]
    initiator, _ = local_p
    d = spawn_peer("target", initiator.protocol, seed=D_SEED)
    initiator.connect("d0", d.endpoint)
    d.ask(op="expect", req_id="r", blocks=[1, 2])
    initiator.write_layer("d0", "r", 0, [5, 6], [1, 2])
    with pytest.raises(InvalidBlockIdsError, match="out of range"):
        initiator.write_layer("d0", "r", 1, [5, 6], [1, GEOMETRY.num_blocks])  # caller bug on layer 1
    for layer in (2, 3):  # the caller carries on regardless: still never DONE
        initiator.write_layer("d0", "r", layer, [5, 6], [1, 2])
    initiator.finish("d0", "r")
    assert initiator.wait("r", 10.0).state is TransferState.FAILED
    d_status = d.ask(op="wait", req_id="r", timeout_s=10.0)
    assert status_of(d_status) is TransferState.FAILED and "write_layer refused" in d_status["reason"]


@pytest.mark.parametrize("local_d", PROTOCOLS, indirect=True)
def test_initiator_killed_mid_transfer_fails_on_target(spawn_peer, local_d) -> None:  # type: ignore[no-untyped-def]
    target, _ = local_d
    p = spawn_peer("initiator", target.protocol, seed=P_SEED)
    target.expect("r", [4, 5, 6])  # no timeout: only the lost connection can fail it
    assert p.ask(op="connect", peer_id="d0", endpoint=target.endpoint())["ok"]
    for layer in (0, 1):
        p.ask(op="write", peer_id="d0", req_id="r", layer=layer, src=[1, 2, 3], dst=[4, 5, 6])
    started = "requests_begun" if target.protocol == "ipc" else "bytes_received"
    assert wait_until(lambda: target.counters.get(started) > 0)
    assert target.poll("r").state is TransferState.PENDING  # 2 of 4 layers, no finish: not DONE
    p.kill()

    assert wait_until(lambda: target.poll("r").is_finished, timeout_s=5.0)
    status = target.poll("r")
    assert status.state is TransferState.FAILED and "connection lost" in (status.reason or "")


@pytest.mark.parametrize("local_p", PROTOCOLS, indirect=True)
def test_target_killed_mid_transfer_fails_on_initiator(spawn_peer, local_p) -> None:  # type: ignore[no-untyped-def]
    initiator, _ = local_p
    d = spawn_peer("target", initiator.protocol, seed=D_SEED)
    initiator.connect("d0", d.endpoint)
    d.ask(op="expect", req_id="r", blocks=[4, 5])
    initiator.write_layer("d0", "r", 0, [1, 2], [4, 5])
    d.ask(op="counters")  # D has served a command after the write was queued
    d.kill()

    status = initiator.wait("r", 5.0)
    assert status.state is TransferState.FAILED, status
    assert "lost" in (status.reason or "")
    assert initiator.counters.get("connections_lost") == 1
    # A request started on the dead connection fails at once instead of waiting forever.
    initiator.write_layer("d0", "r2", 0, [1], [4])
    assert initiator.poll("r2").state is TransferState.FAILED


@pytest.mark.parametrize("local_d", ["tcp"], indirect=True)
def test_expected_request_that_never_starts_times_out(local_d) -> None:  # type: ignore[no-untyped-def]
    target, _ = local_d
    target.expect("r", [1], timeout_s=0.05)
    assert target.poll("r").state is TransferState.PENDING
    assert wait_until(lambda: target.poll("r").is_finished, timeout_s=2.0)
    assert target.poll("r") == TransferStatus(TransferState.FAILED, "transfer timed out")
    assert target.counters.get("transfers_failed") == 1


@pytest.mark.parametrize("local_d", PROTOCOLS, indirect=True)
def test_incompatible_geometry_is_refused_at_connect(local_d) -> None:  # type: ignore[no-untyped-def]
    target, _ = local_d
    other = make_cache(dataclasses.replace(GEOMETRY, block_size=8), 0, shared=False)
    initiator = create_initiator(target.protocol)
    initiator.register(other)
    with pytest.raises(IncompatiblePeerError, match="block_size 8 != 4"):
        initiator.connect("d0", target.endpoint())
    initiator.close()


@pytest.mark.gpu
def test_cuda_ipc_lands_exactly(spawn_peer) -> None:  # type: ignore[no-untyped-def]
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the ipc CUDA path (CUDA IPC handles via cupy) is GPU-only")
    pytest.importorskip("cupy", reason="ipc on CUDA needs cupy (pip install 'splitwise[gpu]')")
    d = spawn_peer("target", "ipc", seed=D_SEED, device="cuda")
    endpoint = d.endpoint
    p_kv = make_cache(GEOMETRY, P_SEED, shared=False, device="cuda")
    initiator = create_initiator("ipc")
    initiator.register(p_kv)
    initiator.connect("d0", endpoint)
    src, dst = [3, 4, 5, 9], [20, 21, 22, 2]
    d.ask(op="expect", req_id="r", blocks=dst)
    for layer in range(GEOMETRY.num_layers):
        initiator.write_layer("d0", "r", layer, src, dst)
    initiator.finish("d0", "r")
    assert initiator.wait("r", 10.0).is_done
    assert status_of(d.ask(op="wait", req_id="r", timeout_s=10.0)) is TransferState.DONE
    expected = initial_kv(GEOMETRY, D_SEED)
    expected[:, :, dst] = p_kv.tensor[:, :, src].cpu()
    assert torch.equal(d.kv(), expected)
    initiator.close()
