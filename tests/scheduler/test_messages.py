"""Wire format: every message round-trips; wrong versions, types and fields are rejected with a reason."""

from __future__ import annotations

import msgpack
import pytest

from scheduler.config import SchedulerConfig
from scheduler.errors import MessageDecodeError
from scheduler.keys import KeySchema, check_id
from scheduler.messages import (
    SCHEMA_VERSION,
    Assignment,
    Cancelled,
    CancelMessage,
    Expired,
    Failed,
    Finished,
    KVGeometry,
    LoadReport,
    MigrateCommand,
    Migrated,
    NodeEvent,
    NodeInfo,
    TokenChunk,
    WorkItem,
    decode,
    encode,
)
from splitwise.codes import FailureCode, Mode, Protocol, Role
from splitwise.endpoint import Endpoint
from splitwise.engine.sampling_params import SamplingParams

KV = KVGeometry(dtype="bfloat16", block_size=16, num_layers=28, num_kv_heads=8, head_dim=128)
NODE = NodeInfo(
    node_id="d0",
    role=Role.DECODE,
    host="10.0.0.2",
    http_port=8000,
    pd_comm_port=8100,
    model_id="qwen",
    kv=KV,
    transfer_protocols=[Protocol.RDMA, Protocol.TCP],
    transfer_endpoints={
        Protocol.RDMA: Endpoint(Protocol.RDMA, "10.0.0.2", 9000, KV, schema=3),
        Protocol.TCP: Endpoint(Protocol.TCP, "10.0.0.2", 9100, KV, access_key="k"),
    },
    incarnation="abc",
    started_ms=12,
)
ASSIGN = Assignment(
    mode=Mode.DISAGG,
    prefill_node_id="p0",
    decode_node_id="d0",
    protocol=Protocol.RDMA,
    decode_endpoint=Endpoint(Protocol.RDMA, "10.0.0.2", 9000, KV, schema=3),
    prefill_host="10.0.0.1",
    prefill_pd_comm_port=8100,
    prefill_incarnation="i1",
    decode_incarnation="i2",
    group="abc123",
    bookings=["p|abc123|p0|i1|r1|1|3", "d|abc123|d0|i2|r1|1|1048576"],
)
PARAMS = SamplingParams(
    temperature=0.7, stop=("\n",), logit_bias=((3, 1.5),), seed=7, prompt_logprobs=2, structured_kind="regex"
)
MESSAGES = [
    NODE,
    WorkItem(
        req_id="r1",
        prompt_token_ids=[1, 2, 3],
        sampling_params=PARAMS,
        frontend_id="fe1",
        created_ms=1,
        deadline_ms=2,
        attempt=1,
        resume_token_ids=[9, 8],
        assignment=ASSIGN,
    ),
    TokenChunk(req_id="r1", attempt=0, index=5, token_ids=[4, 5], logprobs=[-0.1, -2.0]),
    TokenChunk(req_id="r1", attempt=0, index=0, token_ids=[4]),
    Finished(req_id="r1", attempt=2, finish_reason="stop", prompt_tokens=3, completion_tokens=7),
    Failed(req_id="r1", attempt=0, code=FailureCode.DECODE_CAPACITY, message="out of blocks", retryable=True),
    Expired(req_id="r1", attempt=1),
    Cancelled(req_id="r1", attempt=0),
    CancelMessage(req_id="r1", attempt=0, reason="client gone"),
    NodeEvent(req_id="r1", attempt=0, event="decoding", node="d0", detail="remote prefill", ts_ms=5),
    Migrated(
        req_id="r1",
        attempt=1,
        from_node_id="d0",
        decode_node_id="d1",
        decode_incarnation="i9",
        reason="drain",
    ),
    MigrateCommand(req_id="r1", target_node_id="", reason="manual"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: object) -> None:
    payload = encode(msg)  # type: ignore[arg-type]
    assert decode(payload) == msg
    assert msgpack.unpackb(payload)["v"] == SCHEMA_VERSION


def test_typed_fields_come_back_typed() -> None:
    work = decode(encode(MESSAGES[1]))
    assert work.sampling_params == PARAMS and isinstance(work.sampling_params.stop, tuple)
    assert work.assignment.mode is Mode.DISAGG and work.assignment.protocol is Protocol.RDMA
    assert work.assignment.decode_endpoint.geometry == KV and work.assignment.prefill_endpoint is None
    node = decode(encode(NODE))
    assert node.role is Role.DECODE and list(node.transfer_endpoints) == [Protocol.RDMA, Protocol.TCP]
    assert all(type(p) is Protocol for p in node.transfer_protocols)
    failed = decode(encode(MESSAGES[5]))
    assert failed.code is FailureCode.DECODE_CAPACITY
    # On the wire the enums are their strings (readable in redis-cli, stable across versions).
    raw = msgpack.unpackb(encode(NODE), strict_map_key=False)["f"]
    assert raw["role"] == "decode" and sorted(raw["transfer_endpoints"]) == ["rdma", "tcp"]


def _work_fields(**params: object) -> bytes:
    body = msgpack.unpackb(encode(MESSAGES[1]), strict_map_key=False)
    body["f"]["sampling_params"].update(params)
    return msgpack.packb(body)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_work_fields(bogus=1), r"sampling_params: unknown fields \['bogus'\]"),
        (_work_fields(stop=[1]), r"sampling_params.stop\[0\]: expected str"),
        (_work_fields(top_p=2.0), "invalid .*sampling_params.*top_p"),
        (_work_fields(logit_bias=[[1]]), r"logit_bias\[0\]"),
    ],
)
def test_rejects_bad_sampling_params(payload: bytes, reason: str) -> None:
    with pytest.raises(MessageDecodeError, match=reason):
        decode(payload)


def _envelope(**overrides: object) -> bytes:
    body = msgpack.unpackb(encode(MESSAGES[2]))
    body.update(overrides)
    return msgpack.packb(body)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xc1garbage", "not msgpack"),
        (msgpack.packb([1, 2]), "envelope"),
        (_envelope(v=SCHEMA_VERSION + 1), "unsupported schema version"),
        (_envelope(v=0), "unsupported schema version"),
        (_envelope(t="pickle"), "unknown message type"),
        (_envelope(f={"req_id": "r"}), "missing fields"),
        (
            _envelope(f={"req_id": "r", "attempt": 0, "index": 0, "token_ids": [1], "evil": 1}),
            "unknown fields",
        ),
        (_envelope(f={"req_id": "r", "attempt": "0", "index": 0, "token_ids": [1]}), "expected int"),
        (_envelope(f={"req_id": "r", "attempt": 0, "index": 0, "token_ids": ["x"]}), "expected int"),
        (_envelope(f={"req_id": "r", "attempt": True, "index": 0, "token_ids": [1]}), "got bool"),
    ],
)
def test_rejects_bad_payloads(payload: bytes, reason: str) -> None:
    with pytest.raises(MessageDecodeError, match=reason):
        decode(payload)


def test_expect_restricts_the_type() -> None:
    with pytest.raises(MessageDecodeError, match="unexpected message type"):
        decode(encode(MESSAGES[2]), WorkItem)
    nested_bad = msgpack.unpackb(encode(NODE))
    nested_bad["f"]["kv"]["block_size"] = "16"
    nested_bad["f"]["transfer_endpoints"] = {}
    with pytest.raises(MessageDecodeError, match="kv.block_size"):
        decode(msgpack.packb(nested_bad))


def test_node_info_validates_role_and_protocols() -> None:
    with pytest.raises(ValueError, match="--splitwise-role"):
        NodeInfo(node_id="x", role="router", host="h", http_port=1, pd_comm_port=2, model_id="m", kv=KV)
    with pytest.raises(ValueError, match="--cache-transfer-protocol"):
        NodeInfo(
            node_id="x",
            role="decode",
            host="h",
            http_port=1,
            pd_comm_port=2,
            model_id="m",
            kv=KV,
            transfer_protocols=["nvlink"],
        )


def test_load_report_fields() -> None:
    report = LoadReport(queued_prefill_tokens=10, running_requests=2, free_kv_blocks=300, waiting_requests=1)
    assert LoadReport.from_fields({k: str(v) for k, v in report.to_fields().items()}) == report


def test_config_errors_name_the_flag() -> None:
    for kwargs, flag in [
        ({"scheduler_name": "global"}, "--scheduler-name"),
        ({"scheduler_port": 0}, "--scheduler-port"),
        ({"scheduler_topic": "a{b}"}, "--scheduler-topic"),
        ({"scheduler_ttl_s": 0}, "--scheduler-ttl"),
        ({"heartbeat_interval_s": -1}, "--scheduler-heartbeat-interval"),
        ({"max_redispatch": -1}, "--max-redispatch"),
        ({"scheduler_tls_ca_certs": "/ca.pem"}, "--scheduler-tls-ca-certs"),
    ]:
        with pytest.raises(ValueError, match=flag):
            SchedulerConfig(**kwargs)  # type: ignore[arg-type]
    config = SchedulerConfig(heartbeat_interval_s=0.5, dead_after_missed=3)
    assert config.dead_after_ms == 1500 and config.ttl_ms == 900_000


def test_key_schema_is_hash_tagged_and_classified() -> None:
    keys = KeySchema("prod")
    made = [
        keys.nodes,
        keys.heartbeat("n"),
        keys.work("n"),
        keys.control("n"),
        keys.results("fe"),
        keys.alive,
        keys.frontends,
        keys.epoch,
        keys.candidates("abc123", "p"),
        keys.candidates("abc123", "d"),
        keys.candidates("abc123", "m"),
        keys.bookings,
        keys.log,
        keys.dead_letters,
        keys.cluster_token,
    ]
    assert all(k.startswith("{prod}:") for k in made)
    assert all(keys.classify(k) is not None for k in made)
    assert keys.classify("{prod}:other") is None and keys.classify("{dev}:nodes") is None
    assert keys.classify("{prod}:cand:abc123:x") is None
    with pytest.raises(ValueError):
        check_id("req_id", "a{b}")
    with pytest.raises(ValueError):
        check_id("node id", "a|b")


def test_scheduler_urls_and_deployment_flags() -> None:
    from scheduler.config import parse_scheduler_url

    assert parse_scheduler_url("redis://:pw@10.0.0.5:6380/2") == {
        "scheduler_tls": False,
        "scheduler_password": "pw",
        "scheduler_host": "10.0.0.5",
        "scheduler_port": 6380,
        "scheduler_cluster": False,
        "scheduler_db": 2,
    }
    assert parse_scheduler_url("redis+cluster://h:7000")["scheduler_cluster"] is True
    assert parse_scheduler_url("rediss://h:6379")["scheduler_tls"] is True
    sentinel = parse_scheduler_url("redis+sentinel://s1:26379,s2:26379/mymaster")
    assert sentinel["scheduler_sentinel"] == "s1:26379,s2:26379"
    assert sentinel["scheduler_sentinel_service"] == "mymaster"
    config = SchedulerConfig.from_options({"scheduler_url": "redis+sentinel://s1:1,s2:2/svc"})
    assert config.sentinel_addresses() == [("s1", 1), ("s2", 2)] and "sentinel" in config.where
    for bad, flag in [
        ("http://h:1", "--scheduler-url"),
        ("redis+sentinel://h:1", "--scheduler-url"),
        ("redis://h", "--scheduler-url"),
    ]:
        with pytest.raises(ValueError, match=flag):
            parse_scheduler_url(bad)
    with pytest.raises(ValueError, match="--scheduler-sentinel"):
        SchedulerConfig(scheduler_sentinel="nohostport")
    with pytest.raises(ValueError, match="choose one"):
        SchedulerConfig(scheduler_cluster=True, scheduler_sentinel="h:1")
