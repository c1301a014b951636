"""The load generator: arrival schedule, SSE parsing, config errors, and real runs against a real
tiny-model mixed instance (redis-server + `splitwise serve` processes via LocalCluster)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from splitwise.bench.client import RequestOptions, chunk_text, request_body, sse_events
from splitwise.bench.dataset import SampleRequest, random_requests
from splitwise.bench.metrics import SLO
from splitwise.bench.serve_bench import (
    LoadConfig,
    arrival_offsets_s,
    format_report,
    run_load,
    served_model_id,
)
from splitwise.cli import cli
from splitwise.cluster import ClusterSpec, LocalCluster
from splitwise.engine.tiny_model import default_model_dir
from splitwise.engine.tokenizer import Tokenizer

TINY_ARGS = ["--num-kv-blocks", "256", "--max-num-batched-tokens", "256"]


# --- plain data ---------------------------------------------------------------------------------------
def test_poisson_arrivals_are_seeded_and_have_the_requested_mean_gap() -> None:
    offsets = arrival_offsets_s(4000, request_rate=5.0, seed=7)
    assert offsets[0] == 0.0
    assert all(b >= a for a, b in zip(offsets, offsets[1:], strict=False))
    assert offsets == arrival_offsets_s(4000, request_rate=5.0, seed=7)
    assert offsets != arrival_offsets_s(4000, request_rate=5.0, seed=8)
    mean_gap = offsets[-1] / 3999
    assert 0.19 < mean_gap < 0.21  # 1 / rate; 4000 draws put the mean within ~2 %
    assert arrival_offsets_s(3, math.inf, seed=0) == [0.0, 0.0, 0.0]


async def _lines(*lines: str) -> AsyncIterator[str]:
    for line in lines:
        yield line


def _collect(*lines: str) -> list[dict[str, object]]:
    async def go() -> list[dict[str, object]]:
        return [e async for e in sse_events(_lines(*lines))]

    return asyncio.run(go())


def test_sse_events_stop_at_done_and_skip_other_fields() -> None:
    events = _collect(
        ": keep-alive", "", 'data: {"a": 1}', "event: x", 'data:{"b": 2}', "data: [DONE]", 'data: {"c": 3}'
    )
    assert events == [{"a": 1}, {"b": 2}]
    with pytest.raises(ValueError, match="not a JSON object"):
        _collect("data: [1, 2]")


def test_chunk_text_per_endpoint() -> None:
    assert chunk_text({"choices": [{"text": "hi"}]}, "completions") == "hi"
    assert chunk_text({"choices": [{"text": "", "finish_reason": "length"}]}, "completions") == ""
    assert chunk_text({"choices": [{"delta": {"role": "assistant", "content": ""}}]}, "chat") == ""
    assert chunk_text({"choices": [{"delta": {"content": "yo"}}]}, "chat") == "yo"
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}, "chat") == ""


def test_request_body_forces_output_length_unless_told_not_to() -> None:
    sample = SampleRequest([5, 6, 7], 3, 9)
    body = request_body(sample, RequestOptions(endpoint="completions", model="m"))
    assert body["prompt"] == [5, 6, 7] and body["max_tokens"] == 9 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert "ignore_eos" not in request_body(
        sample, RequestOptions(endpoint="completions", model="m", ignore_eos=False)
    )
    chat = request_body(SampleRequest("hello", 1, 2), RequestOptions(endpoint="chat", model="m"))
    assert chat["messages"] == [{"role": "user", "content": "hello"}]
    with pytest.raises(ValueError, match="--endpoint chat"):
        request_body(sample, RequestOptions(endpoint="chat", model="m"))


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"base_urls": ()}, "--base-url"),
        ({"base_urls": ("localhost:8000/v1",)}, "--base-url"),
        ({"endpoint": "embeddings"}, "--endpoint"),
        ({"request_rate": 0.0}, "--request-rate"),
        ({"request_rate": math.nan}, "--request-rate"),
        ({"max_concurrency": 0}, "--max-concurrency"),
        ({"request_timeout_s": 0.0}, "--request-timeout"),
    ],
)
def test_load_config_errors_name_the_flag(kwargs: dict[str, object], flag: str) -> None:
    args: dict[str, object] = {"base_urls": ("http://127.0.0.1:1/v1",), **kwargs}
    with pytest.raises(ValueError, match=flag):
        LoadConfig(**args)  # type: ignore[arg-type]


def test_cli_bad_flags_exit_2_naming_the_flag(tmp_path: Path) -> None:
    runner = CliRunner()
    cases = [
        (["--request-rate", "0"], "--request-rate"),
        (["--request-rate", "fast"], "--request-rate"),
        (["--random-range-ratio", "1.5"], "--random-range-ratio"),
        (["--dataset-name", "sharegpt"], "--dataset-path"),
        (["--tokenizer", str(tmp_path)], "--tokenizer"),
        (["--model", "m", "--base-url", "ftp://x"], "--base-url"),
    ]
    for args, flag in cases:
        result = runner.invoke(cli, ["bench", "serve", "--no-progress", *args])
        assert result.exit_code == 2, (args, result.output)
        assert flag in result.output, (args, result.output)


# --- against a real instance ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_url() -> Iterator[str]:
    spec = ClusterSpec(
        model=str(default_model_dir("tiny")),
        num_prefill=0,
        num_decode=0,
        num_mixed=1,
        threads_per_instance=1,
        extra_args=TINY_ARGS,
    )
    cluster = LocalCluster(spec)
    try:
        cluster.start()
        cluster.wait_ready(timeout_s=180)
        yield cluster.entry.base_url
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir("tiny"))


def _config(url: str, **kwargs: object) -> LoadConfig:
    model = asyncio.run(served_model_id(url))
    # A bounded request time: a stuck request fails the test with its reason instead of hanging it.
    return LoadConfig(base_urls=(url,), model=model, show_progress=False, request_timeout_s=90, **kwargs)  # type: ignore[arg-type]


def test_token_id_prompts_get_exactly_the_requested_output(mixed_url: str, tokenizer: Tokenizer) -> None:
    requests = random_requests(
        tokenizer, num_prompts=3, input_len=40, output_len=6, range_ratio=0.5, seed=1, as_text=False
    )
    run = asyncio.run(run_load(_config(mixed_url, slo=SLO(ttft_ms=60_000, tpot_ms=60_000)), requests))
    assert [r.error for r in run.results] == ["", "", ""]
    for sample, result in zip(requests, run.results, strict=True):
        assert result.output_tokens == sample.output_tokens  # ignore_eos + max_tokens, counted by the server
        assert result.prompt_tokens == sample.prompt_tokens  # the server's usage agrees with what we sent
        assert result.ttft_s is not None and result.last_token_s is not None and result.e2e_s is not None
        assert 0 < result.ttft_s <= result.last_token_s <= result.e2e_s
        # A chunk may carry several tokens (a busy server coalesces them), so there are at most n - 1 gaps,
        # and they add up to the first-to-last chunk time that TPOT divides by n - 1.
        assert len(result.itl_s) <= sample.output_tokens - 1
        assert sum(result.itl_s) == pytest.approx(result.last_token_s - result.ttft_s)
        assert result.tpot_s == pytest.approx(
            (result.last_token_s - result.ttft_s) / (sample.output_tokens - 1)
        )
    m = run.metrics
    assert m.num_completed == 3 and m.total_output_tokens == sum(r.output_tokens for r in requests)
    assert m.slo_attainment == 1.0 and m.num_slo_met == 3
    assert "Successful / failed requests        3 / 0" in format_report(run)


def test_chat_with_max_concurrency_one_never_overlaps(mixed_url: str, tokenizer: Tokenizer) -> None:
    requests = random_requests(
        tokenizer, num_prompts=3, input_len=24, output_len=5, range_ratio=0.0, seed=2, as_text=True
    )
    run = asyncio.run(
        run_load(_config(mixed_url, endpoint="chat", request_rate=50.0, max_concurrency=1), requests)
    )
    assert all(r.success for r in run.results), [r.error for r in run.results]
    assert [r.output_tokens for r in run.results] == [5, 5, 5]
    ordered = sorted(run.results, key=lambda r: r.sent_at_s)
    for before, after in zip(ordered, ordered[1:], strict=False):
        assert before.e2e_s is not None
        assert after.sent_at_s >= before.sent_at_s + before.e2e_s  # the next one waited for the slot


def test_server_errors_are_recorded_not_raised(mixed_url: str) -> None:
    config = LoadConfig(
        base_urls=(mixed_url,), model="no-such-model", show_progress=False, slo=SLO(ttft_ms=1000)
    )
    run = asyncio.run(run_load(config, [SampleRequest([5, 6, 7], 3, 2)] * 2))
    assert run.metrics.num_failed == 2 and run.metrics.num_completed == 0
    assert all(r.error.startswith("HTTP 404") for r in run.results)
    assert run.metrics.slo_attainment == 0.0
    assert "errors (2): HTTP 404" in format_report(run)


def test_unreachable_server_is_a_failed_request() -> None:
    config = LoadConfig(
        base_urls=("http://127.0.0.1:9/v1",), model="m", show_progress=False, request_timeout_s=5
    )
    run = asyncio.run(run_load(config, [SampleRequest([5], 1, 1)]))
    assert not run.results[0].success and "ConnectError" in run.results[0].error


def test_cli_writes_the_result_file(mixed_url: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    args = [
        "bench",
        "serve",
        "--base-url",
        mixed_url,
        "--tokenizer",
        str(default_model_dir("tiny")),
        "--num-prompts",
        "2",
        "--random-input-len",
        "16",
        "--random-output-len",
        "4",
        "--request-rate",
        "10",
        "--slo-ttft-ms",
        "60000",
        "--slo-tpot-ms",
        "60000",
        "--no-progress",
        "--result-file",
        str(out),
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "SLO attainment                      100.0% (2/2)" in result.output
    data = json.loads(out.read_text())
    assert data["config"]["request_rate"] == 10.0 and data["config"]["base_urls"] == [mixed_url]
    assert data["metrics"]["num_completed"] == 2 and data["metrics"]["total_output_tokens"] == 8
    assert data["metrics"]["ttft"]["p99_ms"] > 0
    assert [r["output_tokens"] for r in data["requests"]] == [4, 4]
    assert all(r["requested_prompt_tokens"] == 16 and r["tpot_s"] > 0 for r in data["requests"])


def test_cli_sharegpt_dataset(mixed_url: str) -> None:
    fixture = Path(__file__).parent / "data" / "sharegpt_small.json"
    args = [
        "bench",
        "serve",
        "--base-url",
        mixed_url,
        "--tokenizer",
        str(default_model_dir("tiny")),
        "--endpoint",
        "chat",
        "--dataset-path",
        str(fixture),
        "--sharegpt-output-len",
        "3",
        "--num-prompts",
        "2",
        "--no-progress",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "Successful / failed requests        2 / 0" in result.output
    assert "Total input / generated tokens" in result.output and "/ 6\n" in result.output


# --- vLLM / SGLang conventions ---------------------------------------------------------------------------
def test_base_url_accepts_the_server_root() -> None:
    from splitwise.bench.serve_bench import api_base_url

    for url in (
        "http://h:8000",
        "http://h:8000/",
        "http://h:8000/v1",
        "http://h:8000/v1/",
        "http://h:8000/v1/completions",
    ):
        assert api_base_url(url) == "http://h:8000/v1", url
    assert LoadConfig(base_urls=("http://h:1",)).base_urls == ("http://h:1/v1",)


def test_goodput_as_vllm_spells_it() -> None:
    from splitwise.bench.goodput import parse_goodput, split_goodput_words

    assert split_goodput_words(["--goodput", "ttft:500", "tpot:50", "--num-prompts", "2"]) == [
        "--goodput",
        "ttft:500",
        "--goodput",
        "tpot:50",
        "--num-prompts",
        "2",
    ]
    assert parse_goodput(["ttft:500", "tpot:50", "e2el:9000"]) == {
        "ttft_ms": 500.0,
        "tpot_ms": 50.0,
        "e2el_ms": 9000.0,
    }
    for bad in (["ttft"], ["itl:5"], ["ttft:x"], ["ttft:0"], ["ttft:1", "ttft:2"]):
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput(bad)
    slo = SLO(e2el_ms=100)
    from splitwise.bench.metrics import RequestResult

    assert slo.is_met(RequestResult(success=True, ttft_s=0.01, e2e_s=0.05))
    assert not slo.is_met(RequestResult(success=True, ttft_s=0.01, e2e_s=0.5))


def test_cli_bad_goodput_exits_2_naming_the_flag() -> None:
    result = CliRunner().invoke(
        cli, ["bench", "serve", "--no-progress", "--model", "m", "--goodput", "itl:5"]
    )
    assert result.exit_code == 2 and "--goodput" in result.output, result.output


def test_cli_server_root_and_goodput(mixed_url: str) -> None:
    root = mixed_url.removesuffix("/v1")
    args = ["bench", "serve", "--base-url", root, "--tokenizer", str(default_model_dir("tiny"))]
    args += ["--num-prompts", "2", "--random-input-len", "16", "--random-output-len", "4", "--no-progress"]
    met = CliRunner().invoke(cli, [*args, "--goodput", "ttft:60000", "tpot:60000"])
    assert met.exit_code == 0, met.output
    assert "SLO attainment                      100.0% (2/2)" in met.output
    missed = CliRunner().invoke(cli, [*args, "--goodput", "e2el:0.001"])
    assert missed.exit_code == 0, missed.output
    assert "SLO attainment                      0.0% (0/2)" in missed.output
