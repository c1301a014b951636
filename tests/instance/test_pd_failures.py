"""Failure handling of disaggregated requests, on real clusters (redis-server + `splitwise serve`).

Smoke tests of what only real processes show; the hand-off's every transition and race is tested
deterministically in test_handoff_decode.py / test_handoff_prefill.py.

- P is dead (killed after it served one request) -> D prefills locally (``--pd-fallback local``);
  the request completes with the greedy tokens a mixed instance gives; D counts the fallback in
  /metrics and logs it.
- D dies mid-stream -> the frontend re-dispatches with the tokens already delivered as a resume
  prefix; the client's one stream completes with the full, correct text.
- D has no free KV blocks -> the request waits in D's bounded queue, visible in D's load report in
  Redis, and completes once blocks free up (backing off, never a busy loop); a prompt larger than
  D's whole cache fails at once with the reason (never a silent wait).

The reference ("a mixed instance") is the instance's own engine run in-process with the same
engine flags (tests/instance/helpers.ENGINE_ARGS); test_pd_equivalence shows a mixed instance over
HTTP gives exactly that. Events are ordered by the test, not by timing: a node is killed or frozen
(SIGSTOP, ``pd_helpers.Frozen``) before the step that needs it gone, and the test waits for an
observable state (a metric, a log line) before acting.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import redis

from scheduler.keys import KeySchema
from scheduler.messages import LoadReport
from splitwise.cluster import Child, LocalCluster
from splitwise.engine.config import EngineConfig
from splitwise.engine.engine import LLMEngine
from splitwise.engine.sampling_params import SamplingParams
from tests.instance.helpers import complete
from tests.instance.pd_helpers import (
    NEVER_EXPIRE,
    Background,
    Frozen,
    StreamedCompletion,
    log_text,
    make_prompt,
    metric,
    stream_completion,
    transfer_event,
    wait_until,
)


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Iterator[LLMEngine]:
    engine = LLMEngine(
        EngineConfig(model=str(tiny_model), block_size=4, max_num_batched_tokens=32, num_kv_blocks=512)
    )
    yield engine
    engine.close()


def greedy_text(engine: LLMEngine, prompt: list[int], max_tokens: int) -> str:
    [result] = engine.generate(
        [prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    )
    return result.text


def by_role(cluster: LocalCluster, role: str) -> list[Child]:
    return [c for c in cluster.children if c.role == role]


# --------------------------------------------------------------------------- P dies


@pytest.mark.parametrize("transfer", ["ipc", "tcp"])
def test_dead_prefill_node_falls_back_to_local_prefill(cluster_factory, reference, transfer: str) -> None:  # type: ignore[no-untyped-def]
    # P stays registered (NEVER_EXPIRE), so the frontend keeps pairing D with the dead P.
    cluster = cluster_factory(num_prefill=1, num_decode=1, transfer=transfer, extra=NEVER_EXPIRE)
    [p], [d] = by_role(cluster, "prefill"), by_role(cluster, "decode")
    # One request first: D now holds an open control connection to P, which P's death breaks.
    warm = complete(d.base_url, make_prompt(12, seed=9), max_tokens=4)
    assert warm["usage"]["completion_tokens"] == 4 and transfer_event(d, "transfers_ok") == 1
    cluster.kill(p)
    assert wait_until(lambda: "pd control disconnected" in log_text(d), 30), cluster.log_tail(d)

    prompt = make_prompt(120, seed=1)
    resp = complete(d.base_url, prompt, max_tokens=8, timeout=120.0)
    assert resp["choices"][0]["text"] == greedy_text(reference, prompt, 8)
    assert resp["usage"]["completion_tokens"] == 8
    # Counted and logged: the fallback, not a transfer, produced the KV.
    assert transfer_event(d, "fallbacks") == 1
    assert transfer_event(d, "transfer_failures") == 1
    assert transfer_event(d, "transfers_ok") == 1  # the warm-up only
    assert "prefilling locally" in log_text(d), cluster.log_tail(d)
    # The failed hand-off's reservation and the finished request's blocks are all free again.
    assert wait_until(lambda: metric(d, "splitwise_kv_blocks_used") == 0, 15), cluster.log_tail(d)


# --------------------------------------------------------------------------- D dies


def test_killing_decode_mid_stream_redispatches(cluster_factory, reference) -> None:  # type: ignore[no-untyped-def]
    # The decode node is killed on the first chunk the client sees, with ~900 of its tokens still
    # to produce (a tiny-model step is ~1 ms: a second of decoding against one chunk's delivery).
    cluster = cluster_factory(
        num_prefill=1,
        num_decode=2,
        transfer="ipc",
        extra=["--scheduler-heartbeat-interval", "0.5"],
    )
    [p] = by_role(cluster, "prefill")
    decodes = by_role(cluster, "decode")
    prompt = make_prompt(40, seed=2)
    max_tokens = 900
    want = greedy_text(reference, prompt, max_tokens)
    killed: list[Child] = []

    def kill_the_decoder(state: StreamedCompletion) -> bool:
        if not killed:
            # Exactly one request ran: the decode node holding it logged its landed transfer.
            [victim] = [c for c in decodes if "remote prefill landed" in log_text(c)]
            cluster.kill(victim)
            killed.append(victim)
            state_at_kill.append(len(state.text))
        return True

    state_at_kill: list[int] = []
    # Sent to P's frontend, which survives; the stream is read to its end.
    got = stream_completion(p.base_url, prompt, max_tokens=max_tokens, on_chunk=kill_the_decoder)
    assert killed, "the stream produced no content chunk"
    [survivor] = [c for c in decodes if c is not killed[0]]

    assert got.done and got.finish_reason == "length"
    assert got.text == want, f"killed after {state_at_kill[0]} characters"
    assert got.usage["completion_tokens"] == max_tokens
    assert metric(p, "splitwise_scheduler_frontend_events_total", event="redispatched") == 1
    assert "redispatching" in log_text(p)
    # The resumed attempt ran on the surviving decode node (again disaggregated through P).
    assert "remote prefill landed" in log_text(survivor), cluster.log_tail(survivor)
    for child in (p, survivor):
        assert wait_until(partial(_no_blocks_used, child), 15), cluster.log_tail(child)


def _no_blocks_used(child: Child) -> bool:
    return metric(child, "splitwise_kv_blocks_used") == 0


# --------------------------------------------------------------------------- D is full


def _load_report(cluster: LocalCluster, node_id: str) -> LoadReport:
    host, port = cluster.scheduler_address
    client = redis.Redis(host=host, port=port, decode_responses=True)
    try:
        fields: dict[str, str] = client.hgetall(KeySchema(cluster.spec.topic).heartbeat(node_id))  # type: ignore[assignment]
        return LoadReport.from_fields(fields)
    finally:
        client.close()


def test_decode_without_free_blocks_queues_the_request_until_blocks_free(cluster_factory, reference) -> None:  # type: ignore[no-untyped-def]
    # 40 blocks of 4 tokens on D: one 100-token prompt reserves 29 (prompt + 16 tokens headroom),
    # so a second one cannot reserve until the first finishes. P is frozen while both are sent, so
    # the first holds its reservation (waiting for P's answer) until the test lets P go on.
    cluster = cluster_factory(
        num_prefill=1,
        num_decode=1,
        transfer="tcp",
        extra=["--num-kv-blocks", "40", "--scheduler-heartbeat-interval", "0.3", *NEVER_EXPIRE],
    )
    [p], [d] = by_role(cluster, "prefill"), by_role(cluster, "decode")
    d_id = str(d.info["node_id"])
    prompts = [make_prompt(100, seed=3), make_prompt(100, seed=4)]
    wants = [greedy_text(reference, prompt, 12) for prompt in prompts]
    complete(d.base_url, make_prompt(8, seed=8), max_tokens=2)  # opens D's control connection to P
    assert wait_until(lambda: metric(d, "splitwise_kv_blocks_used") == 0, 15)

    with Frozen(p):
        first = Background(complete, d.base_url, prompts[0], max_tokens=12, timeout=120.0)
        assert wait_until(lambda: metric(d, "splitwise_kv_blocks_used") > 0, 60, 0.05), cluster.log_tail(d)
        second_sent_s = time.monotonic()
        second = Background(complete, d.base_url, prompts[1], max_tokens=12, timeout=120.0)
        # Visible in D's load report in Redis (what the scheduler and `splitwise inspect` read).
        assert wait_until(lambda: _load_report(cluster, d_id).waiting_requests >= 1, 30, 0.1), (
            cluster.log_tail(d)
        )
        assert wait_until(
            lambda: metric(d, "splitwise_num_requests_waiting") >= 1, 10, 0.1
        )  # refreshed every second

    for call, want in zip((first, second), wants, strict=True):
        resp = call.result()
        assert isinstance(resp, dict)
        assert resp["choices"][0]["text"] == want
    waited_s = time.monotonic() - second_sent_s
    assert transfer_event(d, "transfers_ok") == 3  # warm-up and both: no fallback
    assert transfer_event(p, "prefills_shipped") == 3
    assert transfer_event(d, "fallbacks") == 0
    waits = transfer_event(d, "reserve_waits")
    assert waits >= 1
    # Backing off (5 ms doubling to 200 ms): at most ~5 retries a second after the first few,
    # where a busy loop would count thousands.
    assert waits <= 10 + 6 * waited_s, (
        f"{waits} reservation retries in {waited_s:.1f} s: the wait is not backing off"
    )
    assert wait_until(lambda: _load_report(cluster, d_id).waiting_requests == 0, 30, 0.1)
    assert wait_until(lambda: metric(d, "splitwise_kv_blocks_used") == 0, 15)

    # A prompt larger than D's whole cache (170 tokens > 40 x 4) can never get its blocks: it
    # fails at once with the reason instead of waiting forever.
    resp = httpx.post(
        f"{d.base_url}/completions", json={"prompt": make_prompt(170, seed=5), "max_tokens": 4}, timeout=60
    )
    assert resp.status_code >= 400
    assert "whole cache has 40" in resp.text, resp.text
    assert transfer_event(d, "reserve_waits") == waits  # no retry for it
    assert transfer_event(p, "prefills_shipped") == 3  # P never saw it
