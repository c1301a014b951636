"""A slow or stopped prefill node (issue #13, item 3), on real clusters.

P is frozen with SIGSTOP (its sockets stay open, nothing it would send arrives, and its heartbeat
lapses), so D's transfer timeout is what ends the remote prefill: with the default
``--pd-fallback local`` D prefills locally and every request completes with the greedy text.
Nobody re-dispatches because P's lease lapsed: D owns the work item and handles P's failure, so a
second attempt can never meet the first attempt's KV reservation on D. Continued (SIGCONT) in the
middle of a hand-off, P's late answer is ignored and everything is freed on both sides.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitwise.engine.config import EngineConfig
from splitwise.engine.engine import LLMEngine
from splitwise.engine.sampling_params import SamplingParams
from tests.instance.helpers import complete
from tests.instance.pd_helpers import Frozen, log_text, make_prompt, metric, transfer_event, wait_until

# A short heartbeat: P's lease lapses (1.5 s) well before D's transfer timeout (4 s) ends the
# remote prefill, which is the order that used to make the frontend re-dispatch.
FLAGS = ["--scheduler-heartbeat-interval", "0.5", "--transfer-timeout", "4"]


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


def test_stopped_prefill_falls_back_locally_for_every_request(cluster_factory, reference) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(num_prefill=1, num_decode=1, transfer="tcp", extra=FLAGS)
    p = next(c for c in cluster.children if c.role == "prefill")
    d = next(c for c in cluster.children if c.role == "decode")
    warm = complete(d.base_url, make_prompt(12, seed=9), max_tokens=4)
    assert warm["usage"]["completion_tokens"] == 4 and transfer_event(d, "transfers_ok") == 1

    prompts = [make_prompt(30 + 7 * i, seed=20 + i) for i in range(3)]
    results: dict[int, dict] = {}

    def send(i: int) -> None:
        results[i] = complete(d.base_url, prompts[i], max_tokens=12, timeout=120.0)

    with Frozen(p):
        threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        frozen_fallbacks = transfer_event(d, "fallbacks")
    assert sorted(results) == [0, 1, 2], cluster.log_tail(d, 80)
    for i, resp in results.items():
        assert resp["choices"][0]["text"] == _greedy(reference, prompts[i], 12), i
        assert resp["usage"]["completion_tokens"] == 12
    assert frozen_fallbacks == 3, cluster.log_tail(d, 80)
    assert "prefilling locally" in log_text(d)
    assert metric(d, "splitwise_scheduler_frontend_events_total", event="redispatched") == 0
    # P continued: its late answers are ignored, the fenced reservations and P's blocks are freed,
    # and the pair serves remotely again.
    for child in (p, d):
        assert wait_until(lambda c=child: metric(c, "splitwise_kv_blocks_used") == 0, 30), cluster.log_tail(
            child
        )
    after = complete(d.base_url, make_prompt(16, seed=3), max_tokens=6)
    assert after["choices"][0]["text"] == _greedy(reference, make_prompt(16, seed=3), 6)
    assert wait_until(lambda: transfer_event(d, "transfers_ok") == 2, 30), cluster.log_tail(d, 40)
