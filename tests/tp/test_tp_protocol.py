"""The dispatcher never gives a pair that needs a head remap a protocol that cannot remap (rdma),
says so, and `splitwise inspect` shows it (scheduler.dispatch.usable_protocols)."""

from __future__ import annotations

import dataclasses

import pytest

from scheduler.dispatch import Dispatcher, choose_protocol, remap_note, usable_protocols
from scheduler.errors import NoCapacityError
from scheduler.messages import NodeInfo
from scheduler.registry import CandidateGroup
from splitwise.codes import Protocol
from splitwise.commands.inspect import pairing
from splitwise.kv_geometry import KVGeometry


def kv(tp: int, model_heads: int) -> KVGeometry:
    return KVGeometry("float32", 4, 2, max(tp, model_heads), 16, tp_size=tp, model_kv_heads=model_heads)


def node(role: str, geometry: KVGeometry, protocols: str, host_id: str) -> NodeInfo:
    return NodeInfo(
        f"{role}-tp{geometry.tp_size}",
        role,
        "10.0.0.1",
        1,
        2,
        "m",
        geometry,
        [Protocol(p) for p in protocols.split(",")],
        host_id=host_id,
    )


@pytest.mark.parametrize(
    ("p_tp", "d_tp", "model_heads", "decode", "same_host", "chosen"),
    [
        (2, 1, 1, "rdma,tcp", False, "tcp"),  # 2 replicas -> 1 head: rdma cannot remap
        (1, 2, 1, "rdma,tcp", False, "tcp"),
        (1, 4, 2, "rdma,ipc,tcp", True, "ipc"),  # on one host ipc wins anyway
        (2, 1, 1, "rdma", False, None),  # nothing left that can remap
        (2, 1, 4, "rdma,tcp", False, "rdma"),  # 4 heads: both buffers hold them once, no remap
        (2, 2, 1, "rdma,tcp", False, "rdma"),  # equal TP: equal replicas, no remap
    ],
)
def test_a_pair_needing_a_head_remap_never_gets_rdma(
    p_tp: int, d_tp: int, model_heads: int, decode: str, same_host: bool, chosen: str | None
) -> None:
    p = node("prefill", kv(p_tp, model_heads), "rdma,ipc,tcp", "boot-a")
    d = node("decode", kv(d_tp, model_heads), decode, "boot-a" if same_host else "boot-b")
    assert choose_protocol(p, d) == chosen
    remap = p.kv.needs_head_remap(d.kv)
    assert (Protocol.RDMA in usable_protocols(p, d)) == (not remap and "rdma" in decode)
    assert (remap_note(p, d) is not None) == remap


def test_the_note_and_the_no_protocol_error_say_why() -> None:
    p = node("prefill", kv(2, 1), "rdma,tcp", "a")
    assert remap_note(p, node("decode", kv(1, 1), "rdma,tcp", "b")) == (
        "KV heads need a remap (2 -> 1 physical, tp 2 -> 1): rdma cannot remap, tcp is used"
    )
    assert remap_note(p, node("decode", kv(1, 1), "tcp", "b")) is None  # rdma was not wanted anyway
    rdma_only = node("decode", kv(1, 1), "rdma", "b")
    assert remap_note(p, rdma_only) == (
        "KV heads need a remap (2 -> 1 physical, tp 2 -> 1): rdma cannot remap, and no other protocol is shared"
    )
    dispatcher = Dispatcher(None, None)  # type: ignore[arg-type]  # assignment() touches no Redis
    picked = ("disagg", "prefill-tp2|i1", "decode-tp1|i2")
    with pytest.raises(NoCapacityError, match="rdma cannot remap"):
        dispatcher.assignment(
            "r1",
            CandidateGroup("g", "pd", {}),
            picked,
            prompt_tokens=4,
            attempt=0,
            nodes={"prefill-tp2": p, "decode-tp1": rdma_only},
        )


def row(info: NodeInfo) -> dict[str, object]:
    return {
        "node_id": info.node_id,
        "role": info.role,
        "alive": True,
        "model_id": info.model_id,
        "kv": dataclasses.asdict(info.kv),
        "protocols": info.transfer_protocols,
        "host_id": info.host_id,
    }


def test_inspect_shows_the_remap_note_and_the_pair_without_a_protocol() -> None:
    p = node("prefill", kv(2, 1), "rdma,tcp", "a")
    d_tcp = dataclasses.replace(node("decode", kv(1, 1), "rdma,tcp", "b"), node_id="d-tcp")
    d_rdma = dataclasses.replace(node("decode", kv(1, 1), "rdma", "b"), node_id="d-rdma")
    (both,) = pairing([row(p), row(d_tcp), row(d_rdma)])
    assert both["decode"] == ["d-tcp"]
    assert both["notes"] == [
        "d-tcp: KV heads need a remap (2 -> 1 physical, tp 2 -> 1): rdma cannot remap, tcp is used"
    ]
    (none,) = pairing([row(p), row(d_rdma)])
    assert none["decode"] == [] and len(none["why_not"]) == 1
    assert (
        none["why_not"][0].startswith("d-rdma: KV heads need a remap")
        and "no other protocol" in none["why_not"][0]
    )


def test_dispatch_module_imports_no_torch() -> None:
    """The rule runs in routers and frontends: asking about a remap must not load torch."""
    import subprocess
    import sys

    code = "import sys, scheduler.dispatch, splitwise.commands.inspect; print('torch' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )
