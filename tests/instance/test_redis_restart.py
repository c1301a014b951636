"""Redis killed (-9) and restarted empty on the same port under streaming load (issue #13, item 1),
on a real 1P1D cluster: every stream ends with exactly the greedy reference text (no token missing or
repeated: a gap is re-dispatched from what the client has), requests that arrive once Redis is back
are served, the nodes re-register, and a decode node started after the restart pairs with the old
prefill node without falling back (the live instances re-published the cluster token)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from splitwise.engine.config import EngineConfig
from splitwise.engine.engine import LLMEngine
from splitwise.engine.sampling_params import SamplingParams
from tests.instance.helpers import complete
from tests.instance.pd_helpers import (
    Background,
    StreamedCompletion,
    log_text,
    make_prompt,
    metric,
    stream_completion,
    transfer_event,
    wait_until,
)

NUM_STREAMS = 6
MAX_TOKENS = 400


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Iterator[LLMEngine]:
    engine = LLMEngine(
        EngineConfig(model=str(tiny_model), block_size=4, max_num_batched_tokens=32, num_kv_blocks=512)
    )
    yield engine
    engine.close()


def _greedy(engine: LLMEngine, prompt: list[int], max_tokens: int) -> str:
    [result] = engine.generate(
        [prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    )
    return result.text


def test_redis_restart_under_load_loses_no_token_and_new_nodes_pair(cluster_factory, reference) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(
        num_prefill=1, num_decode=1, transfer="tcp", extra=["--scheduler-heartbeat-interval", "0.5"]
    )
    [p] = [c for c in cluster.children if c.role == "prefill"]
    [d] = [c for c in cluster.children if c.role == "decode"]
    assert cluster.redis is not None
    warm = complete(d.base_url, make_prompt(10, seed=99), max_tokens=4)
    assert warm["usage"]["completion_tokens"] == 4

    prompts = [make_prompt(20 + 3 * i, seed=40 + i) for i in range(NUM_STREAMS)]
    started: set[int] = set()

    def on_chunk(i: int, _state: StreamedCompletion) -> bool:
        started.add(i)
        return True

    streams = [
        Background(
            stream_completion,
            (d if i % 2 == 0 else p).base_url,  # both frontends hold requests
            prompts[i],
            max_tokens=MAX_TOKENS,
            on_chunk=lambda state, i=i: on_chunk(i, state),
        )
        for i in range(NUM_STREAMS)
    ]
    assert wait_until(lambda: len(started) == NUM_STREAMS, 120, 0.01), sorted(started)
    cluster.redis.kill()  # SIGKILL: nothing is saved
    cluster.redis.start()  # the same port, an empty data set
    back_at = time.monotonic()

    results = [s.result(timeout_s=300) for s in streams]
    for i, got in enumerate(results):
        assert isinstance(got, StreamedCompletion) and got.done, i
        assert got.text == _greedy(reference, prompts[i], MAX_TOKENS), f"stream {i} differs"
        assert got.usage["completion_tokens"] == MAX_TOKENS
    assert all(wait_until(lambda c=c: "node_reregistered" in log_text(c), 30) for c in (p, d))
    print(
        "redispatched by D's frontend",
        metric(d, "splitwise_scheduler_frontend_events_total", event="redispatched"),
    )

    # Requests arriving 5 s after Redis is back are all served.
    time.sleep(max(0.0, back_at + 5.0 - time.monotonic()))
    for i in range(4):
        prompt = make_prompt(12, seed=70 + i)
        resp = httpx.post(
            f"{(d if i % 2 else p).base_url}/completions",
            json={"prompt": prompt, "max_tokens": 6, "temperature": 0.0, "ignore_eos": True},
            timeout=60,
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] == _greedy(reference, prompt, 6)

    # A decode node started after the restart reads the token the old nodes re-published; the old
    # decode node leaves (deregisters), so the new one serves with the old prefill node.
    assert "cluster token re-published" in log_text(p) + log_text(d)
    new = cluster._spawn("decode-1", "decode", 0, 1)
    cluster.children.append(new)
    cluster.wait_ready(timeout_s=180)
    d.process.terminate()
    d.process.wait(30)
    served = complete(new.base_url, make_prompt(14, seed=5), max_tokens=5)
    assert served["choices"][0]["text"] == _greedy(reference, make_prompt(14, seed=5), 5)
    assert wait_until(lambda: transfer_event(new, "transfers_ok") >= 1, 30), cluster.log_tail(new, 60)
    assert transfer_event(new, "fallbacks") == 0
    assert "refused_auth" not in log_text(p) and "authentication failed" not in log_text(p).lower()
    print(
        "redispatched by P's frontend",
        metric(p, "splitwise_scheduler_frontend_events_total", event="redispatched"),
    )
