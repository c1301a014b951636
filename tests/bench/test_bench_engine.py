"""`splitwise bench engine`: roofline arithmetic, the git-extracted baseline, one tiny real run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from splitwise.bench.engine_baseline import BaselineError, extract_engine, import_baseline
from splitwise.bench.engine_bench import BenchSpec, run_engine_bench
from splitwise.bench.roofline import MachineLimits, ModelCost
from splitwise.cli import cli
from splitwise.engine.config import ModelConfig
from splitwise.engine.tiny_model import default_model_dir

REPO = Path(__file__).resolve().parents[2]
BASELINE = "c5d8111"  # the engine before paged-attention rewrite (issue 18)


def _has_commit(commit: str) -> bool:
    probe = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=REPO, capture_output=True)
    return probe.returncode == 0


def test_model_cost_counts_weights_kv_and_attention() -> None:
    config = ModelConfig.from_dir(default_model_dir("tiny"))  # h 64, 4 heads x 16, 2 kv heads, inter 128
    cost = ModelCost.of(config, torch.float32)
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
    assert cost.matmul_params == 2 * per_layer + 1024 * 64
    assert cost.lm_head_params == 1024 * 64
    assert cost.kv_bytes_per_token == 2 * 2 * 32 * 4
    limits = MachineLimits(bandwidth_bytes_s=1e9, matmul_flops_s=1e15, device="cpu", dtype="float32")
    # Memory bound: one step reads the weights and batch * context K/V once.
    step_bytes = cost.matmul_params * 4 + 2 * 100 * cost.kv_bytes_per_token
    assert cost.decode_roofline_tok_s(limits, batch=2, context_len=100) == pytest.approx(
        2 / (step_bytes / 1e9)
    )


def test_baseline_engine_is_extracted_under_its_own_name(tmp_path: Path) -> None:
    if not _has_commit(BASELINE):
        pytest.skip(f"commit {BASELINE} is not in this checkout's history")
    package = extract_engine(BASELINE, tmp_path)
    assert package == f"splitwise_engine_{BASELINE}"
    source = (tmp_path / package / "engine.py").read_text()
    assert "splitwise.engine" not in source and f"from {package}." in source
    with pytest.raises(BaselineError, match="--baseline-commit"):
        extract_engine("no-such-commit-xyz", tmp_path)


def test_tiny_run_reports_every_system_with_ratios() -> None:
    if not _has_commit(BASELINE):
        pytest.skip(f"commit {BASELINE} is not in this checkout's history")
    import_baseline(BASELINE)
    spec = BenchSpec(
        model_dir=default_model_dir("tiny"),
        batches=[2],
        context_lens=[20],
        prompt_len=8,
        decode_tokens=4,
        repeats=1,
        baseline_commit=BASELINE,
    )
    rows, limits = run_engine_bench(spec)
    assert [r["system"] for r in rows] == ["splitwise", f"baseline@{BASELINE}", "transformers"]
    assert limits.bandwidth_bytes_s > 0 and limits.matmul_flops_s > 0
    ours = rows[0]
    assert {"x_decode_vs_baseline", "x_decode_vs_transformers", "x_prefill_vs_transformers"} <= set(ours)
    for row in rows:
        assert float(row["decode_tok_s"]) > 0
        # The tiny model is all per-op overhead: far under the machine's limits.
        assert float(row["decode_tok_s"]) < float(row["decode_roofline_tok_s"])


def test_cuda_without_a_gpu_names_the_flag() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = CliRunner().invoke(cli, ["bench", "engine", "--device", "cuda", "--no-transformers"])
    assert result.exit_code != 0
    assert "--device" in result.output
