"""`splitwise router`, the front door with no engine, on real clusters (redis-server + instances).

- It serves the OpenAI routes the instances serve, with exactly a mixed engine's greedy text
  (completions, chat, streaming), tokenizing with the model's tokenizer.
- Killing any one instance of a 2P2D cluster leaves the router's URL serving (a request on the
  killed node is re-dispatched or prefilled locally, and later ones go to the survivors).
- A router killed with requests in flight: the client sees a connection error at once (nothing
  hangs), a second router serves the retry (routers are stateless), and the nodes abort the
  orphaned request and free its blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from splitwise.cluster import Child, LocalCluster
from splitwise.engine.config import EngineConfig
from splitwise.engine.engine import LLMEngine
from splitwise.engine.sampling_params import SamplingParams
from tests.instance.helpers import complete
from tests.instance.pd_helpers import (
    StreamedCompletion,
    log_text,
    make_prompt,
    metric,
    stream_completion,
    wait_until,
)


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Iterator[LLMEngine]:
    engine = LLMEngine(
        EngineConfig(model=str(tiny_model), block_size=4, max_num_batched_tokens=32, num_kv_blocks=512)
    )
    yield engine
    engine.close()


def greedy(engine: LLMEngine, prompt: list[int], max_tokens: int) -> str:
    [result] = engine.generate(
        [prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    )
    return result.text


def by_role(cluster: LocalCluster, role: str) -> list[Child]:
    return [c for c in cluster.children if c.role == role]


def test_router_serves_the_openai_routes_with_a_mixed_engines_text(cluster_factory, reference) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(num_prefill=1, num_decode=1, transfer="ipc", router=True)
    router = cluster.entry
    assert router.role == "router"
    prompt = make_prompt(30, seed=5)
    resp = complete(router.base_url, prompt, max_tokens=8)
    assert resp["choices"][0]["text"] == greedy(reference, prompt, 8)
    streamed = stream_completion(router.base_url, prompt, max_tokens=8)
    assert streamed.done and streamed.text == greedy(reference, prompt, 8)
    models = httpx.get(f"{router.base_url}/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [Path(str(cluster.spec.model)).name]
    root = router.base_url.removesuffix("/v1")
    tok = httpx.post(f"{root}/tokenize", json={"prompt": "hello world"}, timeout=10).json()
    assert tok["count"] == len(tok["tokens"]) > 0
    chat = httpx.post(
        f"{router.base_url}/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0.0},
        timeout=60,
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] <= 4
    # The work ran disaggregated on the instances: the router has no engine of its own.
    [d] = by_role(cluster, "decode")
    assert "remote prefill landed" in log_text(d)
    assert metric(router, "splitwise_scheduler_frontend_events_total", event="submitted") == 3


def test_router_keeps_serving_when_any_one_instance_dies(cluster_factory, reference) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(
        num_prefill=2,
        num_decode=2,
        transfer="tcp",
        router=True,
        extra=["--scheduler-heartbeat-interval", "0.5"],
    )
    router = cluster.entry
    prompts = [make_prompt(24, seed=s) for s in range(6)]
    for victim in (by_role(cluster, "prefill")[0], by_role(cluster, "decode")[0]):
        cluster.kill(victim)
        for prompt in prompts:
            resp = complete(router.base_url, prompt, max_tokens=6, timeout=120.0)
            assert resp["choices"][0]["text"] == greedy(reference, prompt, 6)
    assert router.process.poll() is None


def test_killed_router_ends_its_requests_and_another_router_serves_the_retry(
    cluster_factory, reference
) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(
        num_prefill=1,
        num_decode=1,
        transfer="ipc",
        router=True,
        extra=["--scheduler-heartbeat-interval", "0.5"],
    )
    first = cluster.entry
    second = cluster.spawn_router("router-1")
    cluster.children.append(second)
    assert cluster.wait_ready(timeout_s=120)
    [d] = by_role(cluster, "decode")
    prompt = make_prompt(20, seed=11)

    def kill_router(state: StreamedCompletion) -> bool:
        cluster.kill(first)
        return True

    with pytest.raises(httpx.HTTPError):  # the connection breaks: an explicit end, not a hang
        stream_completion(first.base_url, prompt, max_tokens=2000, timeout_s=60.0, on_chunk=kill_router)
    # The node aborts the orphan once the router's lease stayed lapsed (or finishes it first):
    # either way its blocks are freed, nothing keeps running for a client that is gone.
    assert wait_until(lambda: metric(d, "splitwise_kv_blocks_used") == 0, 30), cluster.log_tail(d)
    resp = complete(second.base_url, prompt, max_tokens=8)
    assert resp["choices"][0]["text"] == greedy(reference, prompt, 8)
