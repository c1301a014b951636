"""The API over the real Redis scheduler: a real redis-server, the FrontendScheduler in the server's
process, and a simulated prefill/decode pair as separate processes (``python -m scheduler.sim_node``).

The simulated nodes answer fake token ids (mostly outside the tiny vocabulary, so the text is empty):
these tests check the path through Redis -- token counts, finish reasons, logprobs, 503 and cancel --
while the text itself is checked against the scripted node in the other modules.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from api_support import MAX_MODEL_LEN, MODEL_ID, RecordingBackend, ServerThread, wait_until
from fastapi import FastAPI

from scheduler.config import SchedulerConfig
from scheduler.frontend import FrontendScheduler
from scheduler.sim_node import spawn_sim_node
from splitwise.api import ApiMetrics, create_app
from splitwise.engine.tokenizer import Tokenizer
from splitwise.testing.redis_server import RedisServer

HEARTBEAT_S = 0.1


@dataclass
class RedisStack:
    server: ServerThread
    backend: RecordingBackend

    @property
    def base_url(self) -> str:
        return self.server.base_url


def start_redis_stack(config: SchedulerConfig, tokenizer: Tokenizer, *, model_id: str) -> RedisStack:
    holder: dict[str, RecordingBackend] = {}

    async def build() -> FastAPI:
        frontend = FrontendScheduler(config, model_id=model_id)
        await frontend.start()
        server.cleanup.append(frontend.close)
        holder["backend"] = RecordingBackend(frontend)
        metrics = ApiMetrics()
        metrics.add_counters_source(
            "splitwise_scheduler_events", frontend.stats.snapshot, "Scheduler events."
        )
        return create_app(
            frontend=holder["backend"],
            tokenizer=tokenizer,
            model_id=model_id,
            max_model_len=MAX_MODEL_LEN,
            is_ready=lambda: True,
            metrics=metrics,
        )

    server = ServerThread(build)
    server.start()
    return RedisStack(server, holder["backend"])


@pytest.fixture(scope="module")
def redis_config() -> Iterator[SchedulerConfig]:
    redis = RedisServer().start()
    try:
        yield SchedulerConfig(
            scheduler_port=redis.port,
            scheduler_topic="api",
            heartbeat_interval_s=HEARTBEAT_S,
            block_ms=100,
            scheduler_ttl_s=30.0,
        )
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def pd_stack(redis_config: SchedulerConfig, tokenizer: Tokenizer) -> Iterator[RedisStack]:
    procs = [
        spawn_sim_node(redis_config, "p0", "prefill", "--model-id", MODEL_ID),
        spawn_sim_node(redis_config, "d0", "decode", "--model-id", MODEL_ID, "--token-delay-ms", "20"),
    ]
    stack = start_redis_stack(redis_config, tokenizer, model_id=MODEL_ID)
    try:
        yield stack
    finally:
        stack.server.stop()
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_completion_through_a_pd_pair(pd_stack: RedisStack) -> None:
    client = openai.OpenAI(base_url=pd_stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)
    out = client.completions.create(model=MODEL_ID, prompt=[3, 4, 5], max_tokens=6, logprobs=1)
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens) == (3, 6)
    assert out.choices[0].logprobs is not None
    assert out.choices[0].logprobs.token_logprobs == [-0.5] * 6  # what the simulated node reports
    assert [r.req_id for r in pd_stack.backend.submitted] == [out.id]


def test_chat_stream_through_a_pd_pair(pd_stack: RedisStack) -> None:
    client = openai.OpenAI(base_url=pd_stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)
    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_disconnect_mid_stream_cancels_through_redis(pd_stack: RedisStack) -> None:
    body = {"model": MODEL_ID, "prompt": "slow", "max_tokens": MAX_MODEL_LEN - 10, "stream": True}
    cancelled_before = len(pd_stack.backend.cancelled)
    with httpx.stream("POST", pd_stack.base_url + "/v1/completions", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        first = next(line for line in resp.iter_lines() if line.startswith("data: "))
    req_id = json.loads(first[len("data: ") :])["id"]
    wait_until(lambda: req_id in pd_stack.backend.cancel_results, what="backend.cancel(req_id) to return")
    assert pd_stack.backend.cancelled[cancelled_before:] == [req_id]
    assert pd_stack.backend.cancel_results[req_id] is True  # it was in flight: CancelMessages went to P and D


def test_no_pair_for_the_model_is_503(
    redis_config: SchedulerConfig, tokenizer: Tokenizer, pd_stack: RedisStack
) -> None:
    other = start_redis_stack(redis_config, tokenizer, model_id="unserved-model")
    try:
        client = openai.OpenAI(base_url=other.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model="unserved-model", prompt="x", max_tokens=2)
        assert info.value.status_code == 503
        assert info.value.body["code"] == "no_capacity"  # type: ignore[index]
    finally:
        other.server.stop()
