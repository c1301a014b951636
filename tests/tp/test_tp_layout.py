"""The sharding arithmetic (torch-free) and the slices the loader reads, as plain data."""

from __future__ import annotations

import pytest

from splitwise.engine.parallel.errors import TensorParallelError
from splitwise.engine.parallel.layout import (
    Lane,
    RdmaPorts,
    TPLayout,
    head_map,
    num_physical_kv_heads,
    remap_lanes,
)
from splitwise.engine.parallel.loader import slice_of
from splitwise.engine.parallel.messages import PlanChunk, Shutdown, StepPlan, decode_rank_message, encode


def layout(tp: int, heads: int = 4, kv: int = 2, inter: int = 128, vocab: int = 1001) -> TPLayout:
    return TPLayout(tp_size=tp, num_heads=heads, num_kv_heads=kv, intermediate_size=inter, vocab_size=vocab)


def test_split_kv_heads() -> None:
    lay = layout(2, kv=4)
    assert [lay.q_heads(r) for r in range(2)] == [range(0, 2), range(2, 4)]
    assert [lay.model_kv_heads(r) for r in range(2)] == [range(0, 2), range(2, 4)]
    assert [lay.physical_kv_heads(r) for r in range(2)] == [range(0, 2), range(2, 4)]
    assert lay.num_physical_kv_heads == 4


def test_replicated_kv_heads_get_one_physical_head_per_rank() -> None:
    lay = layout(4, kv=2)
    assert lay.kv_heads_per_rank == 1 and lay.num_physical_kv_heads == 4
    assert [lay.model_kv_heads(r).start for r in range(4)] == [0, 0, 1, 1]
    assert [lay.physical_kv_heads(r).start for r in range(4)] == [0, 1, 2, 3]


def test_vocab_shards_cover_the_vocabulary_once() -> None:
    lay = layout(2, vocab=1001)
    assert lay.vocab_per_rank == 501
    assert [lay.vocab(r) for r in range(2)] == [range(0, 501), range(501, 1001)]


@pytest.mark.parametrize(
    ("tp", "heads", "kv", "inter", "message"),
    [
        (3, 4, 2, 128, "attention heads"),
        (4, 8, 3, 128, "KV heads"),
        (2, 4, 2, 127, "MLP width"),
        (0, 4, 2, 128, ">= 1"),
    ],
)
def test_bad_sizes_name_the_flag(tp: int, heads: int, kv: int, inter: int, message: str) -> None:
    with pytest.raises(ValueError, match="--tensor-parallel-size") as info:
        layout(tp, heads=heads, kv=kv, inter=inter)
    assert message in str(info.value)


def test_head_map() -> None:
    assert head_map(1, 1, 2) == [0, 0]
    assert head_map(1, 2, 1) == [0]
    assert head_map(2, 4, 2) == [0, 2]
    assert head_map(2, 2, 4) == [0, 0, 1, 1]
    assert head_map(4, 4, 4) == [0, 1, 2, 3]
    assert num_physical_kv_heads(2, 4) == 4 and num_physical_kv_heads(4, 2) == 4


def test_remap_lanes() -> None:
    assert remap_lanes(4, 1, 2) == [Lane(0, 0, 0, 0, 2), Lane(0, 1, 2, 2, 2)]
    assert remap_lanes(4, 2, 1) == [Lane(0, 0, 0, 0, 2), Lane(1, 0, 2, 2, 2)]
    assert remap_lanes(4, 2, 2) == [Lane(0, 0, 0, 0, 2), Lane(1, 1, 2, 2, 2)]
    # One model KV head: D's two replicas both come from P's only head.
    assert remap_lanes(1, 1, 2) == [Lane(0, 0, 0, 0, 1), Lane(0, 1, 0, 1, 1)]
    assert remap_lanes(1, 2, 1) == [Lane(0, 0, 0, 0, 1)]


def test_loader_slices() -> None:
    lay = layout(2, kv=2)
    d = 16
    assert slice_of("model.layers.0.self_attn.q_proj.weight", lay, 1, d) == (0, range(32, 64))
    assert slice_of("model.layers.0.self_attn.k_proj.bias", lay, 1, d) == (0, range(16, 32))
    assert slice_of("model.layers.0.self_attn.o_proj.weight", lay, 1, d) == (1, range(32, 64))
    assert slice_of("model.layers.0.self_attn.o_proj.bias", lay, 1, d) is None
    assert slice_of("model.layers.1.mlp.down_proj.weight", lay, 0, d) == (1, range(0, 64))
    assert slice_of("model.layers.1.mlp.up_proj.weight", lay, 1, d) == (0, range(64, 128))
    assert slice_of("lm_head.weight", lay, 1, d) == (0, range(501, 1001))
    assert slice_of("model.norm.weight", lay, 1, d) is None


def test_rank_messages_round_trip() -> None:
    plan = StepPlan([PlanChunk(4, [7], [1, 2]), PlanChunk(0, [1, 2, 3], [5])], all_tokens=True)
    assert decode_rank_message(encode(plan)) == plan
    assert decode_rank_message(encode(Shutdown("bye"))) == Shutdown("bye")
    with pytest.raises(TensorParallelError):
        decode_rank_message(b"\x00garbage")


def test_rank_devices() -> None:
    from splitwise.engine.parallel.runner import rank_device

    assert str(rank_device("cpu", 1)) == "cpu"
    assert str(rank_device("cuda", 1)) == "cuda:1"
    assert str(rank_device("cuda:2", 1)) == "cuda:3"


def test_rdma_comm_ports_one_or_one_per_rank_and_the_buffer_on_the_first() -> None:
    assert RdmaPorts.of((), 2) == RdmaPorts(serve_port=0, unused_ports=())
    assert RdmaPorts.of((7671,), 2) == RdmaPorts(serve_port=7671, unused_ports=())
    # FastDeploy's one port per rank: the ranks share one KV buffer here, served on rank 0's port.
    assert RdmaPorts.of((7671, 7672), 2) == RdmaPorts(serve_port=7671, unused_ports=(7672,))
    with pytest.raises(
        ValueError, match=r"--rdma-comm-ports: 3 ports given.*one per tensor-parallel rank \(2\)"
    ):
        RdmaPorts.of((1, 2, 3), 2)
    with pytest.raises(ValueError, match="--rdma-comm-ports: .* repeats a port"):
        RdmaPorts.of((7671, 7671), 2)


def test_instance_config_checks_rdma_comm_ports_against_the_tp_size() -> None:
    from scheduler.config import SchedulerConfig
    from splitwise.engine.config import EngineConfig
    from splitwise.instance.config import InstanceConfig

    engine = EngineConfig(model="m", tensor_parallel_size=2)
    assert InstanceConfig(
        engine=engine, scheduler=SchedulerConfig(), rdma_comm_ports=(1, 2)
    ).rdma_comm_ports == (1, 2)
    with pytest.raises(ValueError, match="--rdma-comm-ports"):
        InstanceConfig(engine=engine, scheduler=SchedulerConfig(), rdma_comm_ports=(1, 2, 3))
