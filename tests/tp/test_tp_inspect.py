"""What `splitwise inspect` shows of tensor parallelism, and `up`'s TP flags, as plain data."""

from __future__ import annotations

import dataclasses

import pytest

from splitwise.cluster import ClusterSpec
from splitwise.commands.inspect import pairing, rank_layout
from splitwise.kv_geometry import KVGeometry


def kv(tp: int, model_heads: int, head_dim: int = 16) -> KVGeometry:
    return KVGeometry("float32", 4, 2, max(tp, model_heads), head_dim, tp_size=tp, model_kv_heads=model_heads)


def node(node_id: str, role: str, geometry: KVGeometry, model_id: str = "m") -> dict[str, object]:
    return {
        "node_id": node_id,
        "role": role,
        "alive": True,
        "model_id": model_id,
        "kv": dataclasses.asdict(geometry),
    }


def test_rank_layout_lists_each_ranks_heads() -> None:
    assert rank_layout(kv(2, 4)) == [{"rank": 0, "kv_heads": [0, 2]}, {"rank": 1, "kv_heads": [2, 4]}]
    assert rank_layout(kv(2, 1)) == [{"rank": 0, "kv_heads": [0, 1]}, {"rank": 1, "kv_heads": [1, 2]}]
    assert rank_layout(kv(1, 4)) == [{"rank": 0, "kv_heads": [0, 4]}]


def test_different_tp_pairs_and_a_real_mismatch_says_why() -> None:
    nodes = [
        node("p-tp2", "prefill", kv(2, 1)),
        node("d-tp1", "decode", kv(1, 1)),
        node("d-other", "decode", kv(1, 1, head_dim=32)),
        node("d-model", "decode", kv(1, 1), model_id="other"),
    ]
    (row,) = pairing(nodes)
    assert row == {"prefill": "p-tp2", "decode": ["d-tp1"], "why_not": []}
    (lonely,) = pairing([nodes[0], nodes[2], nodes[3]])
    assert lonely["decode"] == []
    assert lonely["why_not"] == [
        "d-other: head_dim: ours 16, peer 32",
        "d-model: model: ours 'm', peer 'other'",
    ]
    assert pairing([nodes[0]])[0]["why_not"] == ["no live decode node"]


def test_cluster_spec_checks_tp_sizes() -> None:
    with pytest.raises(ValueError, match="--prefill-tp/--decode-tp"):
        ClusterSpec(prefill_tp=0)
    assert ClusterSpec(prefill_tp=2, decode_tp=1).prefill_tp == 2


def test_bench_compare_runs_p_and_d_at_their_tp_sizes() -> None:
    from splitwise.bench.compare import SETUP_DISAGG, SETUP_MIXED, CompareConfig

    config = CompareConfig(request_rates=(1.0,), num_prompts=1, prefill_tp=2, decode_tp=1)
    mixed, disagg = config.spec(SETUP_MIXED), config.spec(SETUP_DISAGG)
    assert (mixed.prefill_tp, mixed.decode_tp) == (1, 1)
    assert (disagg.prefill_tp, disagg.decode_tp) == (2, 1)
    assert config.label(SETUP_DISAGG) == "1P1D (tp 2/1)"
    with pytest.raises(ValueError, match="--prefill-tp"):
        CompareConfig(request_rates=(1.0,), num_prompts=1, decode_tp=0)
