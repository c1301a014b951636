"""The official `openai` client against a real 1P1D cluster (redis-server + two `splitwise serve`
processes): completions, chat, streaming, stop strings, seeds, usage, logprobs, errors."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from splitwise.cluster import LocalCluster
from tests.instance.helpers import start_cluster


@pytest.fixture(scope="module")
def cluster(tiny_model: Path) -> Iterator[LocalCluster]:
    c = start_cluster(tiny_model, num_prefill=1, num_decode=1, transfer="ipc")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.entry.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(client: openai.OpenAI) -> str:
    models = client.models.list().data
    assert len(models) == 1
    return models[0].id


def test_completion_usage_and_logprobs(client: openai.OpenAI, model_id: str) -> None:
    resp = client.completions.create(
        model=model_id,
        prompt="The quick brown fox",
        max_tokens=7,
        temperature=0,
        logprobs=1,
        extra_body={"ignore_eos": True},
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 7
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 7
    assert choice.logprobs is not None and len(choice.logprobs.token_logprobs) == 7
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    again = client.completions.create(
        model=model_id,
        prompt="The quick brown fox",
        max_tokens=7,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert again.choices[0].text == choice.text  # greedy is deterministic across P/D


def test_chat_and_streaming_agree(client: openai.OpenAI, model_id: str) -> None:
    messages = [{"role": "user", "content": "Say something about KV caches."}]
    full = client.chat.completions.create(
        model=model_id,
        messages=messages,
        max_tokens=12,
        temperature=0,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )
    stream = client.chat.completions.create(
        model=model_id,
        messages=messages,
        max_tokens=12,
        temperature=0,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    pieces, usage, reasons = [], None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                pieces.append(ch.delta.content)
            if ch.finish_reason:
                reasons.append(ch.finish_reason)
    assert "".join(pieces) == full.choices[0].message.content
    assert reasons == ["length"]
    assert usage is not None and usage.completion_tokens == 12 and full.usage is not None
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_stop_string_cuts_text(client: openai.OpenAI, model_id: str) -> None:
    base = (
        client.completions.create(
            model=model_id, prompt="stop test", max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = next(
        base[i : i + 2]
        for i in range(3, len(base) - 2)
        if base[i : i + 2].strip() and "\ufffd" not in base[i : i + 2]
    )
    cut = client.completions.create(
        model=model_id,
        prompt="stop test",
        max_tokens=16,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    ).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == base[: base.index(stop)]


def test_seed_reproducible(client: openai.OpenAI, model_id: str) -> None:
    def sample(seed: int) -> str:
        return (
            client.completions.create(
                model=model_id,
                prompt="Once upon a time",
                max_tokens=10,
                temperature=1.0,
                seed=seed,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .text
        )

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_errors_have_openai_shape(client: openai.OpenAI, model_id: str, cluster: LocalCluster) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=model_id, prompt="x", max_tokens=0)
    assert "max_tokens" in str(bad.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=model_id, prompt=[5] * 5000, max_tokens=2)
    assert too_long.value.status_code == 400
    raw = httpx.post(
        f"{cluster.entry.base_url}/completions",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert raw.status_code == 400 and "error" in raw.json()


def test_every_instance_accepts_requests(cluster: LocalCluster, model_id: str) -> None:
    for child in cluster.children:
        c = openai.OpenAI(base_url=child.base_url, api_key="unused", max_retries=0, timeout=60)
        out = c.completions.create(
            model=model_id, prompt="hello", max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
        )
        assert out.usage is not None and out.usage.completion_tokens == 3


def test_no_decode_node_gives_503(tiny_model: Path) -> None:
    """With every decode node gone, a prefill node's frontend answers 503, never hangs."""
    c = start_cluster(
        tiny_model,
        num_prefill=1,
        num_decode=1,
        transfer="tcp",
        extra=["--scheduler-heartbeat-interval", "0.3"],
    )
    try:
        prefill = next(ch for ch in c.children if ch.role == "prefill")
        decode = next(ch for ch in c.children if ch.role == "decode")
        c.kill(decode)
        client = openai.OpenAI(base_url=prefill.base_url, api_key="unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        deadline = time.monotonic() + 20
        unavailable: openai.APIStatusError | None = None
        while unavailable is None:
            try:
                client.completions.create(model=model, prompt="x", max_tokens=2)
            except openai.APIStatusError as exc:
                if exc.status_code != 503:
                    raise
                unavailable = exc
            assert time.monotonic() < deadline, "no 503 after the decode node died"
            time.sleep(0.3)
        assert unavailable.response.json()["error"]["message"]
    finally:
        c.stop()


def _scrape(base_url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    return {
        s.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}": s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_transfer_metrics_count_real_transfers(
    cluster: LocalCluster, client: openai.OpenAI, model_id: str
) -> None:
    client.completions.create(
        model=model_id, prompt="metrics " * 20, max_tokens=2, extra_body={"ignore_eos": True}
    )
    decode = next(c for c in cluster.children if c.role == "decode")
    prefill = next(c for c in cluster.children if c.role == "prefill")
    d, p = _scrape(decode.base_url), _scrape(prefill.base_url)
    m = f"model_name={model_id}"
    assert d[f"splitwise_kv_transfer_bytes_total{{direction=in,{m},protocol=ipc}}"] > 0
    # P times the transfer (first layer write -> D confirmed), D the whole remote prefill around it.
    assert p[f"splitwise_kv_transfer_latency_seconds_count{{{m},protocol=ipc}}"] >= 1
    assert d[f"splitwise_remote_prefill_latency_seconds_count{{{m},protocol=ipc}}"] >= 1
    assert (
        p[f"splitwise_kv_transfer_latency_seconds_sum{{{m},protocol=ipc}}"]
        <= d[f"splitwise_remote_prefill_latency_seconds_sum{{{m},protocol=ipc}}"]
    )
    assert (
        p[f"splitwise_kv_transfer_bytes_total{{direction=out,{m},protocol=ipc}}"]
        == d[f"splitwise_kv_transfer_bytes_total{{direction=in,{m},protocol=ipc}}"]
    )
    assert d["splitwise_transfer_events_total{event=transfers_ok}"] >= 1
    assert d["splitwise_kv_blocks_total{}"] > 0


def test_inspect_shows_the_whole_lifecycle(
    cluster: LocalCluster, client: openai.OpenAI, model_id: str
) -> None:
    import json
    import subprocess
    import sys

    assert cluster.redis is not None
    resp = client.completions.create(
        model=model_id, prompt="lifecycle", max_tokens=3, extra_body={"ignore_eos": True}
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "splitwise.cli",
            "inspect",
            "--scheduler-port",
            str(cluster.redis.port),
            "--request",
            resp.id,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    events = [e["event"] for e in json.loads(out.stdout)["request"]["events"]]
    for stage in ("dispatched", "received", "prefilled", "transferred", "decoding", "finished"):
        assert stage in events, (stage, events)
