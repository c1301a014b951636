"""vLLM's and SGLang's serving benchmarks against splitwise, unmodified: their exact requests
(endpoints, JSON bodies, headers) and their exact way of reading the stream, replayed against a
real tiny-model instance. The scripts themselves need packages this project does not install
(vllm itself; pandas/aiohttp), so the shapes are reproduced here from their sources:
vLLM ``vllm/benchmarks/lib/endpoint_request_func.py`` and ``benchmarks/backend_request_func.py``,
SGLang ``python/sglang/bench_serving.py`` (docs/benchmarks.md lists the flags they need)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from splitwise.cluster import ClusterSpec, LocalCluster
from splitwise.engine.tiny_model import default_model_dir

PROMPT = "The benchmark sends this prompt to every server it measures"
OUTPUT_LEN = 6


@pytest.fixture(scope="module")
def server_root() -> Iterator[str]:
    """``http://host:port``: what both benchmarks take as --base-url."""
    spec = ClusterSpec(
        model=str(default_model_dir("tiny")),
        num_prefill=0,
        num_decode=0,
        num_mixed=1,
        threads_per_instance=1,
        extra_args=["--num-kv-blocks", "256"],
    )
    cluster = LocalCluster(spec)
    try:
        cluster.start()
        cluster.wait_ready(timeout_s=180)
        yield cluster.entry.base_url.removesuffix("/v1")
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def model_id(server_root: str) -> str:
    # Both: GET {base_url}/v1/models, then data[0]["id"] when --model is not given.
    listed = httpx.get(f"{server_root}/v1/models", timeout=30).json()
    return str(listed["data"][0]["id"])


def _sglang_lines(server_root: str, path: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """SGLang: aiohttp ``async for line in response.content``, strip, drop "data: ", skip [DONE]."""
    events = []
    with httpx.stream("POST", f"{server_root}{path}", json=payload, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            chunk = line.strip().removeprefix("data: ")
            if chunk and chunk != "[DONE]":
                events.append(json.loads(chunk))
    return events


def _vllm_messages(
    server_root: str, path: str, payload: dict[str, Any], headers: dict[str, str]
) -> list[dict[str, Any]]:
    """vLLM: raw byte chunks, SSE messages split on blank lines, ":" comments skipped."""
    events, buffer = [], ""
    with httpx.stream("POST", f"{server_root}{path}", json=payload, headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for chunk in response.iter_text():
            buffer += chunk
            while "\n\n" in buffer:
                message, buffer = buffer.split("\n\n", 1)
                message = message.strip()
                if message and not message.startswith(":"):
                    data = message.removeprefix("data: ")
                    if data != "[DONE]":
                        events.append(json.loads(data))
    assert buffer.strip() == ""
    return events


def test_sglang_vllm_backend_completions(server_root: str, model_id: str) -> None:
    # `python -m sglang.bench_serving --backend vllm --base-url http://host:port ...`
    payload = {
        "model": model_id,
        "prompt": PROMPT,
        "temperature": 0.0,
        "best_of": 1,
        "max_tokens": OUTPUT_LEN,
        "stream": True,
        "ignore_eos": True,
    }
    events = _sglang_lines(server_root, "/v1/completions", payload)
    texts = [e["choices"][0]["text"] for e in events]  # SGLang indexes choices[0] on every event
    assert sum(1 for t in texts if t) >= 1
    assert len("".join(texts)) > 0


def test_sglang_chat_backend(server_root: str, model_id: str) -> None:
    # `--backend vllm-chat` / `sglang-oai-chat`
    payload = {
        "model": model_id,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0.0,
        "max_tokens": OUTPUT_LEN,
        "stream": True,
        "ignore_eos": True,  # from --extra-request-body, the chat backends do not send it
    }
    events = _sglang_lines(server_root, "/v1/chat/completions", payload)
    content = [e.get("choices", [{}])[0].get("delta", {}).get("content", "") for e in events]
    assert "".join(c or "" for c in content)


def test_vllm_bench_serve_completions(server_root: str, model_id: str) -> None:
    # `vllm bench serve --backend vllm --base-url http://host:port --endpoint /v1/completions --ignore-eos`
    payload = {
        "model": model_id,
        "prompt": PROMPT,
        "repetition_penalty": 1.0,
        "max_tokens": OUTPUT_LEN,
        "logprobs": None,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    events = _vllm_messages(server_root, "/v1/completions", payload, {"x-request-id": "bench-0"})
    token_events = [e for e in events if e.get("choices")]
    usage = [e["usage"] for e in events if not e.get("choices") and e.get("usage")]
    assert token_events, "vLLM marks a request failed when no chunk carries choices"
    assert usage and usage[-1]["completion_tokens"] == OUTPUT_LEN
    assert usage[-1]["prompt_tokens"] > 0


def test_vllm_bench_serve_chat(server_root: str, model_id: str) -> None:
    # `vllm bench serve --backend openai-chat --endpoint /v1/chat/completions --ignore-eos`
    payload = {
        "model": model_id,
        "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
        "max_completion_tokens": OUTPUT_LEN,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    headers = {"Content-Type": "application/json"}
    events = _vllm_messages(server_root, "/v1/chat/completions", payload, headers)
    assert any(e.get("choices") for e in events)
    usage = [e["usage"] for e in events if not e.get("choices") and e.get("usage")]
    assert usage and usage[-1]["completion_tokens"] == OUTPUT_LEN


def test_old_vllm_benchmark_serving_completions(server_root: str, model_id: str) -> None:
    # benchmarks/benchmark_serving.py (before `vllm bench`): best_of, logprobs null, and an
    # "Authorization: Bearer None" header when OPENAI_API_KEY is unset.
    payload = {
        "model": model_id,
        "prompt": PROMPT,
        "temperature": 0.0,
        "best_of": 1,
        "max_tokens": OUTPUT_LEN,
        "logprobs": None,
        "stream": True,
    }
    events = _vllm_messages(server_root, "/v1/completions", payload, {"Authorization": "Bearer None"})
    assert all(e["choices"] for e in events)  # it indexes choices[0] on every event
    assert "".join(e["choices"][0]["text"] for e in events)
