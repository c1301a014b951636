"""`bench compare`: config checks, the table and plot from synthetic rows, and one small real sweep
(tiny model, 2 mixed vs 1P1D, one rate, two requests per setup)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from splitwise.bench.compare import SETUP_DISAGG, SETUP_MIXED, CompareConfig, CompareRow, markdown_table
from splitwise.bench.metrics import SLO
from splitwise.bench.plot import plot_compare
from splitwise.cli import cli
from splitwise.engine.tiny_model import default_model_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(setup: str, label: str, rate: float, ttft_p99: float, tpot_p99: float, attain: float) -> CompareRow:
    return CompareRow(
        setup=setup,
        label=label,
        request_rate=rate,
        num_completed=8,
        num_failed=0,
        request_throughput=rate,
        output_throughput=rate * 64,
        ttft_mean_ms=ttft_p99 / 2,
        ttft_p99_ms=ttft_p99,
        tpot_mean_ms=tpot_p99 / 2,
        tpot_p99_ms=tpot_p99,
        itl_p99_ms=tpot_p99 * 2,
        slo_attainment=attain,
        goodput=rate * attain,
    )


ROWS = [
    _row(SETUP_MIXED, "2 mixed", 0.5, 1200.0, 80.0, 1.0),
    _row(SETUP_DISAGG, "1P1D", 0.5, 2100.0, 40.0, 0.875),
    _row(SETUP_MIXED, "2 mixed", 1.0, 5000.0, 250.0, 0.25),
    _row(SETUP_DISAGG, "1P1D", 1.0, 9000.0, 45.0, 0.0),
]


def test_config_needs_equal_instance_counts() -> None:
    with pytest.raises(ValueError, match=r"--prefill/--decode: P \+ D \(1 \+ 2\) must equal --mixed \(2\)"):
        CompareConfig(request_rates=(1.0,), num_prompts=1, num_mixed=2, num_prefill=1, num_decode=2)
    with pytest.raises(ValueError, match="--request-rates"):
        CompareConfig(request_rates=(), num_prompts=1)
    with pytest.raises(ValueError, match="--request-rates"):
        CompareConfig(request_rates=(1.0, float("inf")), num_prompts=1)
    with pytest.raises(ValueError, match="--num-prompts"):
        CompareConfig(request_rates=(1.0,), num_prompts=0)


def test_config_gives_both_setups_the_same_threads() -> None:
    config = CompareConfig(
        request_rates=(1.0,),
        num_prompts=1,
        num_mixed=3,
        num_prefill=1,
        num_decode=2,
        torch_threads=2,
        instance_args=("--block-size", "8"),
    )
    mixed, disagg = config.spec(SETUP_MIXED), config.spec(SETUP_DISAGG)
    assert (mixed.num_mixed, mixed.num_prefill, mixed.num_decode) == (3, 0, 0)
    assert (disagg.num_mixed, disagg.num_prefill, disagg.num_decode) == (0, 1, 2)
    assert mixed.threads_per_instance == disagg.threads_per_instance == 2
    assert mixed.extra_args == disagg.extra_args == ["--block-size", "8"]
    assert (config.label(SETUP_MIXED), config.label(SETUP_DISAGG)) == ("3 mixed", "1P2D")


def test_markdown_table_rows_sorted_by_rate() -> None:
    lines = markdown_table(ROWS).splitlines()
    assert lines[0].startswith("| setup | rate (req/s) |")
    assert lines[2] == "| 1P1D | 0.5 | 8/0 | 1050 / 2100 | 20 / 40 | 80 | 88% | 0.44 | 32.0 |"
    assert lines[3] == "| 2 mixed | 0.5 | 8/0 | 600 / 1200 | 40 / 80 | 160 | 100% | 0.50 | 32.0 |"
    assert [line.split("|")[2].strip() for line in lines[2:]] == ["0.5", "0.5", "1", "1"]


def test_plot_writes_a_png(tmp_path: Path) -> None:
    path = plot_compare(ROWS, tmp_path / "sub" / "cmp.png", SLO(ttft_ms=3000, tpot_ms=100))
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


@pytest.mark.slow
def test_compare_end_to_end_tiny(tmp_path: Path) -> None:
    """Two real clusters one after the other; every request of both setups completes."""
    out = tmp_path / "cmp"
    args = [
        "bench",
        "compare",
        "--model",
        str(default_model_dir("tiny")),
        "--request-rates",
        "4",
        "--num-prompts",
        "2",
        "--random-input-len",
        "32",
        "--random-output-len",
        "4",
        "--slo-ttft-ms",
        "60000",
        "--slo-tpot-ms",
        "60000",
        "--output-dir",
        str(out),
        "--no-progress",
        "--instance-args",
        "--num-kv-blocks 256 --max-num-batched-tokens 256",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "compare.json").read_text())
    rows = {(r["label"], r["request_rate"]): r for r in data["rows"]}
    assert set(rows) == {("2 mixed", 4.0), ("1P1D", 4.0)}
    assert all(
        r["num_completed"] == 2 and r["num_failed"] == 0 and r["slo_attainment"] == 1.0 for r in rows.values()
    )
    assert [len(s["base_urls"]) for s in data["setups"]] == [2, 2]  # load spread over both instances
    assert (out / "compare.png").read_bytes().startswith(PNG_MAGIC)
    assert "| 1P1D | 4 | 2/0 |" in (out / "compare.md").read_text()
    assert list((out / "logs" / "disaggregated").glob("prefill-0.log"))
