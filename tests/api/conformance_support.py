"""Shared pieces of the openai-client conformance suites (test_openai_conformance*.py): the
two clusters (a mixed instance and 1P1D, started once for the package), the equal-on-both helper
and stream merging."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from splitwise.cluster import LocalCluster
from splitwise.engine.tiny_model import default_model_dir
from splitwise.engine.tokenizer import Tokenizer
from tests.instance.helpers import start_cluster

MODEL = "llama-tiny-seed0-v1"
MESSAGES = [{"role": "user", "content": "Tell me about the quick brown fox."}]
PROMPT = "The quick brown fox jumps over the lazy dog and"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="package")
def clusters() -> Iterator[dict[str, LocalCluster]]:
    started: dict[str, LocalCluster] = {}
    try:
        extra = ["--tool-call-parser", "hermes"]
        model = default_model_dir("tiny")
        started["mixed"] = start_cluster(model, extra=extra, num_prefill=0, num_decode=0, num_mixed=1)
        started["1P1D"] = start_cluster(model, extra=extra, num_prefill=1, num_decode=1)
        yield started
    finally:
        for cluster in started.values():
            cluster.stop()


@pytest.fixture(scope="package")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir("tiny"))


def clients(clusters: dict[str, LocalCluster]) -> dict[str, openai.OpenAI]:
    return {
        name: openai.OpenAI(base_url=c.entry.base_url, api_key="unused", max_retries=0)
        for name, c in clusters.items()
    }


def _normalise(value: Any, approx: bool) -> Any:
    if isinstance(value, dict):
        return {k: _normalise(v, approx) for k, v in value.items() if k not in ("id", "created")}
    if isinstance(value, list):
        return [_normalise(v, approx) for v in value]
    if isinstance(value, float) and approx:
        return pytest.approx(value, abs=1e-4)  # the same tokens; float sums may differ in the last bits
    return value


def on_both(clusters: dict[str, LocalCluster], call: Callable[[openai.OpenAI], Any]) -> Any:
    """Run ``call`` against both clusters; assert equal results; return the mixed one's."""
    results = {name: call(client) for name, client in clients(clusters).items()}
    dumped = {
        name: _normalise(r.model_dump() if hasattr(r, "model_dump") else r, approx=name == "mixed")
        for name, r in results.items()
    }
    assert dumped["1P1D"] == dumped["mixed"]
    return results["mixed"]


def _stream(stream: Any) -> dict[str, Any]:
    """A stream merged per choice (chunk boundaries differ between topologies, content must not)."""
    merged: dict[str, Any] = {"choices": {}, "usage": None}
    for chunk in stream:
        data = chunk.model_dump()
        merged["usage"] = data.get("usage") or merged["usage"]
        for choice in data["choices"]:
            out = merged["choices"].setdefault(
                choice["index"], {"text": "", "logprobs": [], "tool_calls": [], "finish_reason": None}
            )
            delta = choice.get("delta") or {}
            out["text"] += choice.get("text") or delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                out["tool_calls"].append({k: v for k, v in call.items() if k != "id"})
            logprobs = choice.get("logprobs") or {}
            out["logprobs"] += logprobs.get("content") or logprobs.get("top_logprobs") or []
            out["finish_reason"] = choice.get("finish_reason") or out["finish_reason"]
    return merged
