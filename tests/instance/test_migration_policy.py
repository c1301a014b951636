"""The migration policies' decisions on plain data (splitwise/instance/migration_policy.py)."""

from __future__ import annotations

import dataclasses

import pytest

from scheduler.messages import LoadReport, NodeInfo
from scheduler.migration import Peer
from splitwise.codes import Role
from splitwise.instance.migration_policy import PolicyConfig, Running, decide
from splitwise.kv_geometry import KVGeometry

KV = KVGeometry("float32", 4, 2, 2, 8, num_blocks=100)


def _info(node_id: str, kv: KVGeometry = KV, model: str = "m") -> NodeInfo:
    return NodeInfo(
        node_id=node_id, role=Role.DECODE, host="h", http_port=1, pd_comm_port=2, model_id=model, kv=kv
    )


def _peer(node_id: str, free: int, running: int, **kw: object) -> Peer:
    return Peer(_info(node_id, **kw), LoadReport(free_kv_blocks=free, running_requests=running))  # type: ignore[arg-type]


ME = _info("d0")
RUNNING = [Running("a", 30, 0), Running("b", 50, 1), Running("c", 10, 2)]


def test_everything_off_decides_nothing() -> None:
    assert decide(PolicyConfig(), ME, 1, RUNNING, [_peer("d1", 100, 0)]) is None


def test_make_room_moves_the_biggest_request_to_the_roomiest_peer() -> None:
    cfg = PolicyConfig(make_room_free_blocks=5)
    peers = [_peer("d1", 60, 1), _peer("d2", 90, 3), _peer("d0", 100, 0)]  # d0 is me: never a target
    got = decide(cfg, ME, 4, RUNNING, peers)
    assert got is not None and (got.req_id, got.target, got.reason) == ("b", "d2", "make_room")


def test_make_room_waits_while_free_blocks_suffice_or_no_peer_has_room() -> None:
    cfg = PolicyConfig(make_room_free_blocks=5)
    assert decide(cfg, ME, 5, RUNNING, [_peer("d1", 90, 0)]) is None
    assert decide(cfg, ME, 4, RUNNING, [_peer("d1", 54, 0)]) is None  # 50 blocks + 5 do not fit in 54


def test_balance_moves_the_newest_request_to_the_least_used_peer() -> None:
    cfg = PolicyConfig(balance_kv_gap=0.3, balance_min_requests=2)
    got = decide(cfg, ME, 10, RUNNING, [_peer("d1", 80, 1), _peer("d2", 50, 0)])
    assert got is not None and (got.req_id, got.target, got.reason) == ("c", "d1", "balance")


def test_balance_needs_both_gaps_and_the_same_geometry() -> None:
    cfg = PolicyConfig(balance_kv_gap=0.3, balance_min_requests=2)
    assert decide(cfg, ME, 10, RUNNING, [_peer("d1", 30, 0)]) is None  # usage 0.9 vs 0.7: gap 0.2
    assert decide(cfg, ME, 10, RUNNING, [_peer("d1", 90, 2)]) is None  # 3 vs 2 requests
    other = dataclasses.replace(KV, block_size=8)
    assert decide(cfg, ME, 10, RUNNING, [_peer("d1", 90, 0, kv=other)]) is None
    assert decide(cfg, ME, 10, RUNNING, [_peer("d1", 90, 0, model="x")]) is None


def test_flags_are_validated_with_their_names() -> None:
    with pytest.raises(ValueError, match="--migrate-balance-kv-gap"):
        PolicyConfig(balance_kv_gap=1.5)
    with pytest.raises(ValueError, match="--migrate-make-room-free-blocks"):
        PolicyConfig(make_room_free_blocks=-1)
