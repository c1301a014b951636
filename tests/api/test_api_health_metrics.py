"""GET /health, /v1/models and /metrics."""

from __future__ import annotations

import httpx
import openai
import pytest
from api_support import MAX_MODEL_LEN, MODEL_ID, LocalStack, wait_until
from prometheus_client.parser import text_string_to_metric_families

from splitwise.api import ApiMetrics


def scrape(stack: LocalStack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = httpx.get(stack.base_url + "/metrics", timeout=20)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def requests_total(samples: dict, endpoint: str, outcome: str) -> float:
    return samples.get(("splitwise_requests_total", (("endpoint", endpoint), ("outcome", outcome))), 0.0)


def test_health_follows_readiness(local_stack: LocalStack) -> None:
    assert httpx.get(local_stack.base_url + "/health", timeout=20).status_code == 200
    local_stack.ready["value"] = False
    try:
        assert httpx.get(local_stack.base_url + "/health", timeout=20).status_code == 503
    finally:
        local_stack.ready["value"] = True
    assert httpx.get(local_stack.base_url + "/health", timeout=20).status_code == 200


def test_models_lists_the_served_model(local_stack: LocalStack) -> None:
    client = openai.OpenAI(base_url=local_stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=20)
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert models.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN  # type: ignore[index]


def test_metrics_count_requests_and_latencies(local_stack: LocalStack) -> None:
    client = openai.OpenAI(base_url=local_stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=20)
    before = scrape(local_stack)
    client.completions.create(model=MODEL_ID, prompt="x", max_tokens=4)
    list(
        client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True
        )
    )
    httpx.post(local_stack.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 0}, timeout=20)
    httpx.post(local_stack.base_url + "/v1/completions", json={"prompt": "x", "model": "nope"}, timeout=20)
    # A stream is counted when its response ends, just after the client saw [DONE].
    wait_until(
        lambda: (
            requests_total(scrape(local_stack), "/v1/chat/completions", "success")
            == requests_total(before, "/v1/chat/completions", "success") + 1
        ),
        what="stream counted",
    )
    after = scrape(local_stack)

    def delta(name: str, labels: tuple[tuple[str, str], ...] = (("model_name", MODEL_ID),)) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert (
        requests_total(after, "/v1/completions", "success")
        - requests_total(before, "/v1/completions", "success")
        == 1
    )
    assert (
        requests_total(after, "/v1/completions", "invalid_request")
        - requests_total(before, "/v1/completions", "invalid_request")
        == 1
    )
    assert (
        requests_total(after, "/v1/completions", "not_found")
        - requests_total(before, "/v1/completions", "not_found")
        == 1
    )
    assert delta("vllm:time_to_first_token_seconds_count") == 2
    assert delta("vllm:e2e_request_latency_seconds_count") == 2
    assert delta("vllm:time_per_output_token_seconds_count") == 2
    assert delta("vllm:inter_token_latency_seconds_count") == (4 - 1) + (3 - 1)
    assert delta("vllm:generation_tokens_total") == 7
    assert after[("splitwise_requests_in_flight", ())] == 0
    assert after[("splitwise_scheduler_events_total", (("event", "submitted"),))] >= 2


def test_runtime_metrics_are_exposed(local_stack: LocalStack) -> None:
    names = {name for name, _ in scrape(local_stack)}
    for name in (
        "splitwise_num_requests_waiting",
        "splitwise_num_requests_running",
        "splitwise_kv_cache_usage_ratio",
        "splitwise_kv_blocks_used",
        "splitwise_kv_blocks_total",
        "splitwise_prefix_cache_hit_rate",
        "splitwise_queued_prefill_tokens",
        "splitwise_redispatches_total",
    ):
        assert name in names, name


def test_prefix_cache_hit_rate() -> None:
    metrics = ApiMetrics()
    metrics.record_prefix_cache_lookup(queried_tokens=100, hit_tokens=25)
    metrics.record_prefix_cache_lookup(queried_tokens=100, hit_tokens=75)
    assert metrics.registry.get_sample_value("splitwise_prefix_cache_hit_rate") == pytest.approx(0.5)
    labels = {"model_name": "unknown"}
    assert metrics.registry.get_sample_value("vllm:prefix_cache_hits_total", labels) == 100
    assert metrics.registry.get_sample_value("vllm:prefix_cache_queries_total", labels) == 200
    metrics.kv_transfer_bytes.labels(model_name="m", protocol="tcp", direction="send").inc(4096)
    metrics.kv_transfer_fallbacks.labels(model_name="m", from_protocol="rdma", to_protocol="tcp").inc()
    text = metrics.render()[0].decode()
    assert 'splitwise_kv_transfer_bytes_total{direction="send",model_name="m",protocol="tcp"} 4096.0' in text
    assert (
        'splitwise_kv_transfer_fallbacks_total{from_protocol="rdma",model_name="m",to_protocol="tcp"} 1.0'
        in text
    )
    assert "_created" not in text
