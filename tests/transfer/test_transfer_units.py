"""Plain-data pieces of splitwise.transfer: block runs, protocol choice, registry, message codec."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from scheduler.dispatch import choose_protocol
from scheduler.messages import KVGeometry, NodeInfo
from splitwise.codes import Protocol
from splitwise.engine.sampling_params import SamplingParams
from splitwise.transfer import messages
from splitwise.transfer.base import BlockRun, Endpoint, check_block_ids, coalesce_runs
from splitwise.transfer.errors import (
    InvalidBlockIdsError,
    ProtocolError,
    UnknownProtocolError,
)
from splitwise.transfer.registry import get_transport, parse_protocols


@pytest.mark.parametrize(
    ("src", "dst", "runs"),
    [
        ([], [], []),
        ([4], [9], [(4, 9, 1)]),
        ([4, 5, 6], [10, 11, 12], [(4, 10, 3)]),
        ([4, 5, 6], [10, 11, 20], [(4, 10, 2), (6, 20, 1)]),
        ([4, 6, 7], [10, 11, 12], [(4, 10, 1), (6, 11, 2)]),
        ([7, 6], [1, 2], [(7, 1, 1), (6, 2, 1)]),
        ([1, 2, 3], [3, 2, 1], [(1, 3, 1), (2, 2, 1), (3, 1, 1)]),
        ([0, 1, 5, 6, 7, 2], [8, 9, 10, 11, 12, 13], [(0, 8, 2), (5, 10, 3), (2, 13, 1)]),
    ],
)
def test_coalesce_runs(src: list[int], dst: list[int], runs: list[tuple[int, int, int]]) -> None:
    assert coalesce_runs(src, dst) == [BlockRun(*run) for run in runs]
    # Expanding the runs gives back the pairs, in order.
    expanded = [
        (r.src_start + i, r.dst_start + i) for r in coalesce_runs(src, dst) for i in range(r.num_blocks)
    ]
    assert expanded == list(zip(src, dst, strict=True))


def test_coalesce_rejects_bad_input() -> None:
    with pytest.raises(InvalidBlockIdsError, match="3 source blocks but 2"):
        coalesce_runs([1, 2, 3], [1, 2])
    with pytest.raises(InvalidBlockIdsError, match="negative"):
        coalesce_runs([1, -1], [1, 2])


def test_check_block_ids() -> None:
    check_block_ids([0, 7], 8, side="destination")
    with pytest.raises(InvalidBlockIdsError, match=r"out of range \[0, 8\)") as info:
        check_block_ids([0, 8, 9], 8, side="destination", req_id="r")
    assert info.value.block_ids == [8, 9] and info.value.req_id == "r"
    with pytest.raises(InvalidBlockIdsError, match="repeat"):
        check_block_ids([1, 1], 8, side="source")


def _node(role: str, host: str, protocols: str) -> NodeInfo:
    """Same-host detection compares ``host_id`` (ops, #17), so one host here means one host id."""
    kv = KVGeometry("float32", 4, 2, 2, 8)
    return NodeInfo(
        f"{role}-{host}", role, host, 1, 2, "m", kv, list(parse_protocols(protocols)), host_id=f"boot-{host}"
    )


@pytest.mark.parametrize(
    ("decode", "prefill", "same_host", "chosen"),
    [
        ("rdma,ipc", "rdma,ipc", True, "ipc"),
        ("rdma,ipc", "rdma,ipc", False, "rdma"),
        ("ipc,rdma", "rdma,ipc", False, "rdma"),
        ("tcp,rdma", "rdma,tcp", False, "tcp"),
        ("rdma,tcp", "tcp,rdma", False, "rdma"),
        ("rdma,ipc,tcp", "tcp,ipc", False, "tcp"),
        ("tcp", "ipc,tcp", True, "tcp"),  # ipc only when both offer it
        ("ipc,tcp", "tcp", True, "tcp"),
        ("ipc", "ipc,tcp", False, None),  # ipc needs one host: no common protocol
        ("rdma", "tcp", True, None),
    ],
)
def test_the_one_protocol_chooser(decode: str, prefill: str, same_host: bool, chosen: str | None) -> None:
    """The decode node's preference order decides; ipc wins on one host (scheduler.dispatch)."""
    d = _node("decode", "10.0.0.1", decode)
    p = _node("prefill", "10.0.0.1" if same_host else "10.0.0.2", prefill)
    assert choose_protocol(p, d) == chosen


def test_parse_protocols_validates_the_flag() -> None:
    assert parse_protocols(" rdma , ipc ") == ("rdma", "ipc")
    for bad, message in (("", "empty"), ("rdma,smoke", "unknown"), ("tcp,tcp", "repeats")):
        with pytest.raises(ValueError, match=message):
            parse_protocols(bad)


def test_registry_knows_builtins_and_refuses_unknown_names() -> None:
    assert get_transport("tcp").target.__name__ == "TcpTarget"
    assert get_transport("ipc").initiator.__name__ == "IpcInitiator"
    with pytest.raises(UnknownProtocolError, match="no transport named 'carrier-pigeon'"):
        get_transport("carrier-pigeon")


ENDPOINT = Endpoint(
    "ipc", "h", 1, KVGeometry("float32", 4, 2, 2, 8, 64), device="cuda", cuda_ipc_handle=b"\xff"
)

SAMPLES: list[messages.Message] = [
    messages.XferHello("p0", KVGeometry("bfloat16", 16, 2, 8, 128, num_blocks=64), "9f" * 16),
    messages.XferHelloReply(False, "head_dim 64 != 128", KVGeometry("bfloat16", 16, 2, 8, 64)),
    messages.LayerWrite("r-1", 3, [[0, 4], [9, 1]], 5 * 2 * 4096),
    messages.RequestBegin("r-1"),
    messages.RequestGrant("r-1", True, "", [0, 1, 2, 3, 9]),
    messages.RequestAbort("r-1", "copy failed"),
    messages.RequestFinish("r-1", 20),
    messages.RequestResult("r-1", True, ""),
    messages.AuthChallenge("p0", b"\x00" * 32),
    messages.AuthHello(
        "d0", b"\x01" * 32, b"\x02" * 32, messages.Compatibility("m", KVGeometry("float32", 4, 2, 2, 8))
    ),
    messages.AuthWelcome("p0", b"\x03" * 32, messages.Compatibility("m", KVGeometry("float32", 4, 2, 2, 8))),
    messages.Refused("auth", "authentication failed"),
    messages.PrefillTask(
        7,
        "r-1",
        [1, 2, 3],
        SamplingParams(temperature=0.0, stop=("\n",), stop_token_ids=(2,)),
        [4, 5],
        "tcp",
        ENDPOINT,
    ),
    messages.PrefillResult(8, "r-1", 42, -0.25),
    messages.PrefillFailed(9, "r-1", "out of blocks", True),
    messages.CancelRequest(10, "r-1", "client went away"),
    messages.MigrateOffer(11, "r-1", 40, Protocol.IPC, ["r-1~mig0", "r-1~mig1"]),
    messages.Granted(11, [4, 5, 6]),
    messages.MigrateCommit(
        12, "r-1", b"\x80", [1, 2, 3], [7, 8], SamplingParams(seed=3, temperature=0.7), 4, 2, ["r-1~mig0"]
    ),
    messages.MigrateAbort(13, "r-1", "target too slow"),
    messages.Ack(7),
    messages.ErrorReply(7, "unknown request", False),
]


def test_every_message_type_has_a_sample() -> None:
    assert {type(m).TAG for m in SAMPLES} == set(messages.CODEC.by_tag)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).TAG)
def test_message_round_trip(message: messages.Message) -> None:
    assert messages.decode(messages.encode(message)) == message


V = messages.SCHEMA_VERSION


def _packed(**body: object) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def _task(**sampling_params: object) -> bytes:
    return _packed(
        v=V,
        t="prefill_task",
        call_id=1,
        req_id="r",
        prompt_token_ids=[1],
        sampling_params=sampling_params,
        dst_block_ids=[0],
        protocol="tcp",
        endpoint=dataclasses.asdict(ENDPOINT),
    )


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\xc1\xc1\xc1", "undecodable"),
        (_packed(), "schema version None"),
        (msgpack.packb([1, 2]), "not a map"),
        (_packed(v=V + 1, t="ack", call_id=1), f"schema version {V + 1}"),
        (_packed(v=V, t="teleport", call_id=1), "unknown message type"),
        (_packed(v=V, t="ack"), "fields"),
        (_packed(v=V, t="ack", call_id=1, extra=2), "fields"),
        (_packed(v=V, t="ack", call_id="1"), "call_id"),
        (_packed(v=V, t="ack", call_id=True), "call_id"),
        (_packed(v=V, t="layer_write", req_id="r", layer=0, runs=[[0, "x"]], payload_bytes=1), "runs"),
        (_task(temperature=-1.0), "temperature must be >= 0"),
        (_task(temperature=0.0, frobnicate=1), r"sampling_params: unknown fields \['frobnicate'\]"),
        (_task(stop=[1]), r"sampling_params.stop\[0\]: expected str"),
    ],
)
def test_decode_refuses_malformed_frames(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        messages.decode(data)


def test_messages_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        messages.Ack(1).call_id = 2  # type: ignore[misc]
