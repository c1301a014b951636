"""Ports and QP addressing knobs (#11): the ACTIVE port is used whatever its number, a NIC with no
active port is a clear error, and GID index / traffic class / service level reach the QPs from
the --rdma-* flags or the NCCL/FastDeploy environment names."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rdma.errors import VerbsCallError
from rdma.fake import FakeBackend, FakeFabric, FakePort
from rdma.resources import choose_nics, first_active_port, int_option, qp_policy
from rdma.transport import RdmaInitiator, RdmaTarget
from splitwise.engine.kv_cache import KVCache, KVCacheGeometry
from splitwise.transfer.base import TransportOptions

GEOMETRY = KVCacheGeometry(
    num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8, dtype="float16"
)
DOWN = FakePort(is_active=False, gid="0000:0000:0000:0000:0000:ffff:0a00:00f1")


def test_a_nic_cabled_on_port_2_transfers_through_port_2() -> None:
    d_port2 = FakePort(gid="0000:0000:0000:0000:0000:ffff:0a00:0002")
    p_port2 = FakePort(gid="0000:0000:0000:0000:0000:ffff:0a00:0003")
    fabric = FakeFabric()
    fabric.add_device("d0", ports={1: DOWN, 2: d_port2})
    fabric.add_device(
        "p0", ports={1: dataclasses.replace(DOWN, gid="0000:0000:0000:0000:0000:ffff:0a00:00f2"), 2: p_port2}
    )
    backend = FakeBackend(fabric)
    assert first_active_port(backend.open_device("d0")).port_num == 2
    options = TransportOptions(connect_timeout_s=5, cluster_token="t")
    target = RdmaTarget(options, backend=backend, nics=["d0"])
    initiator = RdmaInitiator(options, backend=backend, nics=["p0"])
    p_kv, d_kv = KVCache(GEOMETRY), KVCache(GEOMETRY)
    p_kv.as_bytes().copy_(torch.arange(GEOMETRY.total_bytes).remainder(253).to(torch.uint8))
    try:
        target.register(d_kv)
        initiator.register(p_kv)
        initiator.connect("d", target.endpoint())
        target.expect("r", [5, 6], timeout_s=10)
        for layer in range(GEOMETRY.num_layers):
            initiator.write_layer("d", "r", layer, [1, 2], [5, 6])
        initiator.finish("d", "r")
        assert initiator.wait("r", 10).is_done
        got = d_kv.tensor[:, :, [5, 6]].view(torch.int16)
        assert torch.equal(got, p_kv.tensor[:, :, [1, 2]].view(torch.int16))
        assert initiator._peers["d"].lanes[0].conn.port.port_num == 2
    finally:
        initiator.close()
        target.close()


def test_no_active_port_names_every_port() -> None:
    fabric = FakeFabric().add_device("d0", ports={1: DOWN, 2: dataclasses.replace(DOWN, gid="::2")})
    with pytest.raises(VerbsCallError, match=r"no active port on d0 \(1: down, 2: down\)"):
        first_active_port(FakeBackend(fabric).open_device("d0"))


def test_traffic_class_and_service_level_reach_the_qp() -> None:
    options = TransportOptions(extra={"rdma_traffic_class": "106", "rdma_service_level": "3"})
    policy = qp_policy(options, env={})
    assert (policy.traffic_class, policy.service_level) == (106, 3)
    fabric = FakeFabric().add_device("d0").add_device("p0")
    backend = FakeBackend(fabric)
    opts = dataclasses.replace(options, cluster_token="t", connect_timeout_s=5)
    target, initiator = (
        RdmaTarget(opts, backend=backend, nics=["d0"]),
        RdmaInitiator(opts, backend=backend, nics=["p0"]),
    )
    try:
        target.register(KVCache(GEOMETRY))
        initiator.register(KVCache(GEOMETRY))
        initiator.connect("d", target.endpoint())
        qp = initiator._peers["d"].lanes[0].conn.qp
        assert qp.rtr is not None  # type: ignore[attr-defined]
        assert (qp.rtr.traffic_class, qp.rtr.service_level) == (106, 3)  # type: ignore[attr-defined]
    finally:
        initiator.close()
        target.close()


def test_environment_names_fill_in_for_missing_options() -> None:
    empty = TransportOptions()
    env = {"NCCL_IB_GID_INDEX": "3", "NCCL_IB_TC": "0x60", "NCCL_IB_SL": "5"}
    assert int_option(empty, "rdma_gid_index", env) == 3
    assert (qp_policy(empty, env).traffic_class, qp_policy(empty, env).service_level) == (0x60, 5)
    # FastDeploy's own names win over NCCL's; an explicit option wins over both.
    assert int_option(empty, "rdma_gid_index", {**env, "KVCACHE_RDMA_GID_INDEX": "1"}) == 1
    assert int_option(TransportOptions(extra={"rdma_gid_index": "0"}), "rdma_gid_index", env) == 0
    with pytest.raises(ValueError, match="NCCL_IB_SL: 'high' is not an integer"):
        qp_policy(empty, {"NCCL_IB_SL": "high"})
    with pytest.raises(ValueError, match="service_level"):
        qp_policy(empty, {"NCCL_IB_SL": "16"})


def test_a_cpu_kv_cache_uses_each_listed_nic_once() -> None:
    """A gpu-mode list (entry per GPU, names repeat, '+' stripes) on a CPU KV cache: every NIC once."""
    kv = KVCache(GEOMETRY)
    env = {"KVCACHE_RDMA_NICS": "mlx5_0,mlx5_0,mlx5_1+mlx5_2"}
    assert choose_nics(kv, TransportOptions(), env) == ["mlx5_0", "mlx5_1", "mlx5_2"]
    assert choose_nics(kv, TransportOptions(extra={"rdma_nics": "mlx5_9"}), env) == ["mlx5_9"]


def test_serve_flags_become_transport_options() -> None:
    from scheduler.config import SchedulerConfig
    from splitwise.engine.config import EngineConfig
    from splitwise.engine.tiny_model import default_model_dir
    from splitwise.instance.config import InstanceConfig

    engine = EngineConfig(model=str(default_model_dir("tiny")))
    config = InstanceConfig(
        engine=engine,
        scheduler=SchedulerConfig(),
        rdma_gid_index=3,
        rdma_traffic_class=106,
        rdma_service_level=0,
    )
    assert config.transport_extra() == {
        "rdma_gid_index": "3",
        "rdma_traffic_class": "106",
        "rdma_service_level": "0",
    }
    with pytest.raises(ValueError, match="--rdma-service-level: 16"):
        InstanceConfig(engine=engine, scheduler=SchedulerConfig(), rdma_service_level=16)
