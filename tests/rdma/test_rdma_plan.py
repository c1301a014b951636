"""Planning above the verbs calls: addresses, splits, striping, batching; QP attributes; messages."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from rdma import messages
from rdma.connection import QPPolicy, rtr_attrs, rts_attrs
from rdma.errors import InvalidConnectionInfoError
from rdma.messages import Hello, HelloReply, QpEndpoint, RequestResult, TargetLane
from rdma.plan import WriteOp, batches, max_chunk_bytes, plan_layer, stripe, to_work_requests
from rdma.verbs import Completion, LinkLayer, PortInfo, SendQueueSlots, WcOpcode, WcStatus
from splitwise.engine.kv_cache import KVCacheGeometry
from splitwise.transfer.base import BlockRun, coalesce_runs

# 2 layers, 8 blocks of 4 tokens x 2 heads x 8 dims x 2 bytes = 128 bytes per block, 1 KiB region.
GEOMETRY = KVCacheGeometry(
    num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8, dtype="float16"
)
BPB = GEOMETRY.bytes_per_block
LOCAL, REMOTE = 0x10000, 0x90000


def test_geometry_assumption() -> None:
    assert (BPB, GEOMETRY.bytes_per_region) == (128, 1024)


def test_adjacent_blocks_become_one_write_per_kind() -> None:
    runs = coalesce_runs([4, 5, 6], [1, 2, 3])
    ops = plan_layer(GEOMETRY, 1, runs, local_base=LOCAL, remote_base=REMOTE, max_msg_bytes=1 << 30)
    # layer 1 K region starts at 2*1024, V at 3*1024
    assert ops == [
        WriteOp(LOCAL + 2048 + 4 * BPB, REMOTE + 2048 + 1 * BPB, 3 * BPB),
        WriteOp(LOCAL + 3072 + 4 * BPB, REMOTE + 3072 + 1 * BPB, 3 * BPB),
    ]


def test_remote_address_is_peer_base_plus_block_offset() -> None:
    runs = [BlockRun(0, 7, 1), BlockRun(3, 2, 1)]
    ops = plan_layer(GEOMETRY, 0, runs, local_base=LOCAL, remote_base=REMOTE, max_msg_bytes=1 << 30)
    assert [op.remote_addr - REMOTE for op in ops] == [
        GEOMETRY.block_offset(0, 0, 7),
        GEOMETRY.block_offset(0, 0, 2),
        GEOMETRY.block_offset(0, 1, 7),
        GEOMETRY.block_offset(0, 1, 2),
    ]
    assert [op.local_addr - LOCAL for op in ops] == [0, 3 * BPB, 1024, 1024 + 3 * BPB]


def test_runs_longer_than_max_message_split_at_block_boundaries() -> None:
    assert max_chunk_bytes(128, 300) == 256
    ops = plan_layer(
        GEOMETRY, 0, [BlockRun(0, 0, 5)], local_base=LOCAL, remote_base=REMOTE, max_msg_bytes=300
    )
    assert [op.length for op in ops] == [256, 256, 128] * 2
    assert ops[1].local_addr == LOCAL + 256 and ops[1].remote_addr == REMOTE + 256


def test_blocks_larger_than_max_message_split_in_max_size_pieces() -> None:
    assert max_chunk_bytes(128, 100) == 100
    ops = plan_layer(GEOMETRY, 0, [BlockRun(0, 0, 1)], local_base=0, remote_base=0, max_msg_bytes=100)
    assert [(op.local_addr, op.length) for op in ops] == [(0, 100), (100, 28), (1024, 100), (1124, 28)]


def test_bad_layer_and_message_size() -> None:
    with pytest.raises(ValueError):
        plan_layer(GEOMETRY, 2, [], local_base=0, remote_base=0, max_msg_bytes=1)
    with pytest.raises(ValueError):
        max_chunk_bytes(128, 0)


def test_stripe_balances_bytes_and_keeps_order() -> None:
    ops = [WriteOp(i, i, length) for i, length in enumerate([400, 100, 100, 100, 300])]
    lanes = stripe(ops, 2)
    assert [[op.local_addr for op in lane] for lane in lanes] == [[0], [1, 2, 3, 4]]
    assert stripe(ops, 1) == [ops]
    with pytest.raises(ValueError):
        stripe(ops, 0)


def test_batches_signal_only_the_last_wr_and_fit_the_queue() -> None:
    wrs = to_work_requests(
        [WriteOp(i, i, 8) for i in range(5)],
        local_base=0x1000,
        lkey=1,
        remote_base=0x2000,
        rkey=2,
        first_wr_id=100,
    )
    cut = batches(wrs, max_batch=2)
    assert [[w.wr_id for w in b] for b in cut] == [[100, 101], [102, 103], [104]]
    assert [[w.signaled for w in b] for b in cut] == [[False, True], [False, True], [True]]
    assert all(w.lkey == 1 and w.rkey == 2 for b in cut for w in b)
    assert [(w.local_addr, w.remote_addr) for w in cut[1]] == [(0x1002, 0x2002), (0x1003, 0x2003)]


def test_send_queue_slots_free_up_to_the_signaled_completion() -> None:
    slots = SendQueueSlots(4)
    wrs = to_work_requests([WriteOp(0, 0, 8)] * 4, local_base=0, lkey=1, remote_base=0, rkey=2, first_wr_id=0)
    slots.reserve(wrs, qpn=1)
    assert slots.num_free == 0
    slots.retire(Completion(1, WcStatus.SUCCESS, WcOpcode.RDMA_WRITE, 1))
    assert slots.num_free == 2
    slots.retire(Completion(3, WcStatus.WR_FLUSH_ERR, None, 1))
    assert slots.num_free == 4


ROCE = PortInfo(1, True, LinkLayer.ETHERNET, 4096, 0, "0000:0000:0000:0000:0000:ffff:0a00:0001", 3, 1 << 30)
IB = PortInfo(1, True, LinkLayer.INFINIBAND, 4096, 7, "fe80:0000:0000:0000:0002:c903:0001:0001", 0, 1 << 30)


def peer(link_layer: str, mtu: int = 1024) -> QpEndpoint:
    return QpEndpoint(
        "mlx5_1", 1, LinkLayer(link_layer), 9, "0000:0000:0000:0000:0000:ffff:0a00:0002", 0x77, 0xABCDE, mtu
    )


def test_roce_rtr_uses_the_grh_with_a_routable_hop_limit_and_min_mtu() -> None:
    rtr = rtr_attrs(ROCE, peer("Ethernet"), QPPolicy())
    assert (rtr.is_global, rtr.dgid, rtr.sgid_index, rtr.dlid) == (True, peer("Ethernet").gid, 3, 0)
    assert (rtr.hop_limit, rtr.traffic_class, rtr.path_mtu_bytes) == (64, 0, 1024)
    assert (rtr.dest_qpn, rtr.rq_psn, rtr.max_dest_rd_atomic, rtr.min_rnr_timer) == (0x77, 0xABCDE, 1, 12)


def test_infiniband_rtr_uses_the_lid() -> None:
    rtr = rtr_attrs(IB, peer("InfiniBand", 4096), QPPolicy())
    assert (rtr.is_global, rtr.dgid, rtr.dlid, rtr.path_mtu_bytes) == (False, None, 9, 4096)


def test_link_layer_mismatch_is_refused() -> None:
    with pytest.raises(InvalidConnectionInfoError, match="link layers differ"):
        rtr_attrs(IB, peer("Ethernet"), QPPolicy())


def test_rts_attributes_are_not_pyverbs_defaults() -> None:
    rts = rts_attrs(0x123, QPPolicy())
    assert (rts.sq_psn, rts.timeout, rts.retry_cnt, rts.rnr_retry, rts.max_rd_atomic) == (0x123, 14, 7, 6, 1)


@pytest.mark.parametrize(
    "field,value", [("timeout", 0), ("rnr_retry", 8), ("hop_limit", 1), ("max_rd_atomic", 0)]
)
def test_policy_validation_names_the_field(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        QPPolicy(**{field: value})


LANE = TargetLane(
    peer("Ethernet"),
    kv_addr=0x7F00_0000_0000,
    kv_length=4096,
    kv_rkey=0x1234,
    doorbell_addr=0x10,
    doorbell_rkey=5,
)


@pytest.mark.parametrize(
    "message",
    [
        Hello("p0", GEOMETRY, [peer("Ethernet"), peer("InfiniBand")]),
        HelloReply(True, "", GEOMETRY, [LANE]),
        RequestResult("req-1", False, "completion error"),
    ],
)
def test_messages_round_trip(message: messages.Message) -> None:
    assert messages.decode(messages.encode(message)) == message


def test_messages_refuse_other_versions_and_bad_fields() -> None:
    body = msgpack.unpackb(messages.encode(HelloReply(True, "", GEOMETRY, [LANE])))
    with pytest.raises(InvalidConnectionInfoError, match="schema version"):
        messages.decode(msgpack.packb({**body, "v": 99}))
    lane = dict(body["lanes"][0], kv_rkey="x")
    with pytest.raises(InvalidConnectionInfoError, match="kv_rkey"):
        messages.decode(msgpack.packb({**body, "lanes": [lane]}))
    with pytest.raises(InvalidConnectionInfoError, match="expected fields"):
        messages.decode(msgpack.packb({**body, "extra": 1}))
    with pytest.raises(InvalidConnectionInfoError):
        messages.decode(b"\xc1garbage")
    geometry = dict(body["geometry"], block_size="16")
    with pytest.raises(InvalidConnectionInfoError, match="geometry.block_size"):
        messages.decode(msgpack.packb({**body, "geometry": geometry}))
    assert dataclasses.asdict(LANE)["qp"]["qpn"] == 0x77


def test_request_tag_is_a_stable_32_bit_value() -> None:
    assert messages.request_tag("req-1") == messages.request_tag("req-1") < 2**32
    assert messages.request_tag("req-1") != messages.request_tag("req-2")


def test_bandwidth_script_runs_on_the_fake(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "rdma_bandwidth.py"
    spec = importlib.util.spec_from_file_location("rdma_bandwidth", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--fake", "--iters", "8", "--latency-iters", "2", "--max-kib", "16"]) == 0
    out = capsys.readouterr().out
    assert "line rate 100 Gb/s" in out and "16KiB" in out
