"""The advertised address and same-host detection (ipc) by host id, never by address strings."""

from __future__ import annotations

import pytest

from scheduler.config import SchedulerConfig
from scheduler.dispatch import choose_protocol
from scheduler.messages import KVGeometry, NodeInfo
from splitwise.engine.config import EngineConfig
from splitwise.instance.config import InstanceConfig
from splitwise.instance.host_identity import host_id, is_wildcard, routable_address

KV = KVGeometry("float32", 16, 2, 2, 8)


def node(role: str, host: str, hid: str) -> NodeInfo:
    return NodeInfo(
        node_id=f"{role}-{host}-{hid}",
        role=role,
        host=host,
        host_id=hid,
        http_port=1,
        pd_comm_port=2,
        model_id="m",
        kv=KV,
        transfer_protocols=["ipc", "tcp"],
    )


def test_ipc_needs_equal_host_ids_not_equal_addresses() -> None:
    assert choose_protocol(node("prefill", "127.0.0.1", "a"), node("decode", "10.0.0.5", "a")) == "ipc"
    assert choose_protocol(node("prefill", "10.0.0.5", "a"), node("decode", "10.0.0.5", "b")) == "tcp"
    assert choose_protocol(node("prefill", "h", ""), node("decode", "h", "")) == "tcp"  # unknown: never ipc


def test_host_id_is_stable_and_names_the_ipc_namespace() -> None:
    assert host_id() == host_id() != ""
    assert "ipc:[" in host_id()  # /proc is there on Linux: boot id + IPC namespace


def test_a_wildcard_is_never_advertised() -> None:
    engine = EngineConfig(model="/m")
    sched = SchedulerConfig(scheduler_name="local")
    with pytest.raises(ValueError, match="--advertise-host"):
        InstanceConfig(engine=engine, scheduler=sched, host="0.0.0.0")
    config = InstanceConfig(engine=engine, scheduler=sched, host="0.0.0.0", advertise_host="10.1.2.3")
    assert config.advertised_host == "10.1.2.3" and config.host == "0.0.0.0"
    assert not is_wildcard(routable_address())
