"""Killing one tensor-parallel rank (rank 1, SIGKILL) of a prefill or a decode instance of a P/D
pair mid-request: the request is served correctly anyway (P's rank: D prefills locally; D's rank:
D deregisters, fails the request as retryable, and the client's frontend re-dispatches it to the
other decode node with the tokens already delivered), the rank's instance exits 1 with every one of
its ranks gone (by pid), and the peer instance keeps serving. Real `splitwise serve` processes,
P tp=2, D tp=2. (A client of the dying instance's own frontend gets one explicit error:
tests/tp/test_tp_rank_death.py.)

Ordered by the test, not by timing: P's rank 1 is stopped (SIGSTOP) before the request is sent,
so rank 0 cannot finish the prefill's first all-reduce, and killed once P logged the request's
arrival; D's rank 1 is killed on the first streamed token, with ~900 still to decode.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator

import httpx
import pytest

from splitwise.cluster import Child, LocalCluster
from splitwise.engine.config import EngineConfig
from splitwise.engine.engine import LLMEngine
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.tiny_model import default_model_dir
from tests.instance.helpers import ALWAYS_DISAGG, complete, start_cluster
from tests.instance.pd_helpers import (
    Background,
    log_text,
    make_prompt,
    transfer_event,
    wait_until,
)
from tests.tp.tp_support import is_alive, rank_pids

pytestmark = pytest.mark.slow

MODEL = default_model_dir("tiny")
WAIT_S = 180.0  # generous bounds on a loaded machine; nothing waits for them to pass


@pytest.fixture(scope="module")
def reference() -> Iterator[LLMEngine]:
    """A single-process TP=1 engine with the instances' engine flags (tests/instance/helpers)."""
    engine = LLMEngine(
        EngineConfig(model=str(MODEL), block_size=4, max_num_batched_tokens=32, num_kv_blocks=512)
    )
    yield engine
    engine.close()


def greedy_text(engine: LLMEngine, prompt: list[int], max_tokens: int) -> str:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return engine.generate([prompt], params)[0].text


def by_role(cluster: LocalCluster, role: str) -> list[Child]:
    return [c for c in cluster.children if c.role == role]


def assert_instance_gone(cluster: LocalCluster, child: Child, pids: list[int]) -> None:
    assert child.process.wait(timeout=WAIT_S) == 1, cluster.log_tail(child)
    assert "stopping the instance: its engine is lost" in log_text(child), cluster.log_tail(child)
    assert wait_until(lambda: not any(is_alive(pid) for pid in pids), 30), [p for p in pids if is_alive(p)]


def test_killed_prefill_rank_falls_back_and_decode_keeps_serving(reference: LLMEngine) -> None:
    # With no live prefill node, D takes requests alone (conditional disaggregation's no_prefill).
    no_prefill = [*ALWAYS_DISAGG, "--disagg-max-prefill-queue", "1000000"]
    cluster = start_cluster(MODEL, transfer="ipc", prefill_tp=2, decode_tp=2, scheduler_args=no_prefill)
    try:
        [p], [d] = by_role(cluster, "prefill"), by_role(cluster, "decode")
        (p_rank1,), d_ranks = rank_pids(log_text(p)), rank_pids(log_text(d))
        # Warm up until one request was handed off: the pair is formed before anything is killed
        # (until P's first heartbeat is in, the no_prefill rule serves a request on D alone).
        warm = make_prompt(12, seed=10)

        def handed_off() -> bool:
            assert complete(d.base_url, warm, max_tokens=4, timeout=WAIT_S)["usage"]["completion_tokens"] == 4
            return transfer_event(d, "transfers_ok") >= 1

        assert wait_until(handed_off, WAIT_S), cluster.log_tail(d)
        fallbacks = transfer_event(d, "fallbacks")
        prompt = make_prompt(40, seed=11)
        os.kill(p_rank1, signal.SIGSTOP)  # P's rank 0 will block in the prefill's first all-reduce
        call = Background(complete, d.base_url, prompt, max_tokens=8, timeout=WAIT_S)
        assert wait_until(lambda: "prefill request received" in log_text(p), WAIT_S), cluster.log_tail(p)
        os.kill(p_rank1, signal.SIGKILL)

        resp = call.result(WAIT_S)
        assert isinstance(resp, dict)
        assert resp["choices"][0]["text"] == greedy_text(reference, prompt, 8)
        assert transfer_event(d, "fallbacks") == fallbacks + 1  # counted, and logged:
        assert "remote prefill failed; prefilling locally" in log_text(d), cluster.log_tail(d)
        assert_instance_gone(cluster, p, [p.process.pid, p_rank1])

        # D and its ranks live on, and serve a new request (prefilled locally: P is gone).
        assert d.process.poll() is None and all(is_alive(pid) for pid in d_ranks)
        again = make_prompt(20, seed=12)
        assert complete(d.base_url, again, max_tokens=6, timeout=WAIT_S)["choices"][0]["text"] == greedy_text(
            reference, again, 6
        )
    finally:
        cluster.stop()


def stream_events(
    base_url: str, prompt: list[int], max_tokens: int, on_token: Callable[[], None]
) -> list[dict[str, object]]:
    """Every SSE event of a streamed greedy completion; ``on_token`` runs once, on the first token."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
    }
    events: list[dict[str, object]] = []
    with httpx.stream("POST", f"{base_url}/completions", json=body, timeout=WAIT_S) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            events.append(json.loads(line[5:]))
            if len(events) == 1:
                on_token()
    return events


def test_killed_decode_rank_redispatches_the_request_and_prefill_keeps_serving(reference: LLMEngine) -> None:
    # Two decode nodes: the request held by the one that loses a rank resumes on the other.
    cluster = start_cluster(
        MODEL,
        transfer="ipc",
        num_decode=2,
        prefill_tp=2,
        decode_tp=2,
        extra=["--scheduler-heartbeat-interval", "0.5"],
    )
    try:
        [p], decodes = by_role(cluster, "prefill"), by_role(cluster, "decode")
        p_ranks = rank_pids(log_text(p))
        killed: list[tuple[Child, list[int]]] = []

        def kill_a_decode_rank() -> None:
            # Exactly one request ran: the decode node holding it logged its landed transfer.
            [victim] = [c for c in decodes if "remote prefill landed" in log_text(c)]
            (rank1,) = rank_pids(log_text(victim))
            os.kill(rank1, signal.SIGKILL)
            killed.append((victim, [victim.process.pid, rank1]))

        # Sent to P's frontend, which survives: ~900 tokens still to decode when the rank dies.
        prompt = make_prompt(40, seed=13)
        events = stream_events(p.base_url, prompt, 900, kill_a_decode_rank)
        assert killed, "the stream produced no token"
        victim, victim_pids = killed[0]
        [survivor] = [c for c in decodes if c is not victim]
        # No error: the stream completes with the unkilled greedy text, token-exact.
        assert not [e for e in events if "error" in e], events[-3:]
        text = "".join(str(e["choices"][0]["text"]) for e in events)  # type: ignore[index]
        assert text == greedy_text(reference, prompt, 900)
        # The victim deregistered before it failed the request as retryable; P's frontend
        # re-dispatched it (resuming after the delivered tokens) to the surviving decode node.
        victim_log = log_text(victim)
        assert "node_deregistered" in victim_log, cluster.log_tail(victim)
        assert victim_log.index("node_deregistered") < victim_log.index("engine lost; failing the request")
        assert "redispatching" in log_text(p) and "resume_tokens" in log_text(p), cluster.log_tail(p)
        assert "remote prefill landed" in log_text(survivor), cluster.log_tail(survivor)
        assert_instance_gone(cluster, victim, victim_pids)

        # P (and its ranks) keeps serving, handing off to the surviving decode node.
        assert p.process.poll() is None and all(is_alive(pid) for pid in p_ranks)
        again = make_prompt(20, seed=14)
        resp = complete(p.base_url, again, max_tokens=6, timeout=WAIT_S)
        assert resp["choices"][0]["text"] == greedy_text(reference, again, 6)
    finally:
        cluster.stop()
