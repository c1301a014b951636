"""Drain on real processes: `splitwise drain` (grace 0: the running decode is handed back and
resumed elsewhere) and SIGTERM (the running decode finishes in place while the node is out of
dispatch, shown as draining), both with the client's stream token-exact and the node exiting 0.

Events are ordered by the stream itself: the node is drained on the first content chunk the client
sees, with hundreds of its tokens still to produce (as in test_pd_failures' kill test).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from scheduler.keys import KeySchema
from splitwise.cluster import Child, LocalCluster
from splitwise.engine.config import EngineConfig
from splitwise.engine.engine import LLMEngine
from splitwise.engine.sampling_params import SamplingParams
from splitwise.testing.redis_server import RedisServer
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
    wait_until,
)

MAX_TOKENS = 600


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


def cli(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    host, port = cluster.scheduler_address
    scheduler = [
        "--scheduler-host",
        host,
        "--scheduler-port",
        str(port),
        "--scheduler-topic",
        cluster.spec.topic,
    ]
    return subprocess.run(
        [sys.executable, "-m", "splitwise.cli", *args, *scheduler], capture_output=True, text=True, timeout=60
    )


def redis_of(cluster: LocalCluster) -> redis.Redis:
    host, port = cluster.scheduler_address
    return redis.Redis(host=host, port=port, decode_responses=True)


def holder(decodes: list[Child]) -> Child:
    """The decode node serving the (one) request: it logged its landed transfer."""
    [victim] = [c for c in decodes if "remote prefill landed" in log_text(c)]
    return victim


def decodes_of(cluster: LocalCluster) -> list[Child]:
    return [c for c in cluster.children if c.role == "decode"]


def test_cli_drain_hands_the_running_decode_back_and_the_stream_resumes_elsewhere(
    cluster_factory, reference
) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(num_prefill=1, num_decode=2, transfer="ipc", extra=NEVER_EXPIRE)
    [p] = [c for c in cluster.children if c.role == "prefill"]
    decodes = decodes_of(cluster)
    prompt = make_prompt(40, seed=3)
    want = greedy_text(reference, prompt, MAX_TOKENS)
    drained: list[Child] = []
    answers: list[subprocess.CompletedProcess[str]] = []

    def drain_the_decoder(state: StreamedCompletion) -> bool:
        if not drained:
            victim = holder(decodes)
            # Frozen while the command is written: it reads it before its next decode step, with
            # the request still running there (hundreds of tokens to go).
            with Frozen(victim):
                answers.append(cli(cluster, "drain", victim.name, "--grace-period", "0", "--reason", "test"))
            drained.append(victim)
        return True

    # Sent to P's frontend, which is not drained; the stream is read to its end.
    got = stream_completion(p.base_url, prompt, max_tokens=MAX_TOKENS, on_chunk=drain_the_decoder)
    assert drained and answers[0].returncode == 0, answers[0].stderr
    assert "drain sent to" in answers[0].stdout
    victim = drained[0]
    [survivor] = [c for c in decodes if c is not victim]
    assert got.done and got.finish_reason == "length"
    assert got.text == want
    assert got.usage["completion_tokens"] == MAX_TOKENS
    assert victim.process.wait(timeout=60) == 0, cluster.log_tail(victim)
    text = log_text(victim)
    assert "request handed back to its frontend" in text, cluster.log_tail(victim, 60)
    assert '"handed_back": 1' in text and '"grace_expired": true' in text, cluster.log_tail(victim, 60)
    # Handed back retryably: the frontend re-dispatched it (no client-visible error) to the survivor.
    assert metric(p, "splitwise_scheduler_frontend_events_total", event="redispatched") == 1
    assert metric(p, "splitwise_scheduler_frontend_events_total", event="terminal_error") == 0
    assert "remote prefill landed" in log_text(survivor)
    client = redis_of(cluster)
    try:  # deregistered: gone from the registry
        assert client.hget(KeySchema(cluster.spec.topic).nodes, victim.name) is None
    finally:
        client.close()


def test_sigterm_drains_in_place_out_of_dispatch_and_exits_0(cluster_factory, reference) -> None:  # type: ignore[no-untyped-def]
    # P is frozen while the request waits for its prefill on D: D's drain (SIGTERM) waits for it
    # (a remote prefill in flight is not handed back) for as long as the test looks at it.
    cluster = cluster_factory(
        num_prefill=1,
        num_decode=2,
        transfer="ipc",
        extra=[*NEVER_EXPIRE, "--drain-grace-period", "300", "--transfer-timeout", "300"],
    )
    [p] = [c for c in cluster.children if c.role == "prefill"]
    decodes = decodes_of(cluster)
    entry = decodes[0]
    keys = KeySchema(cluster.spec.topic)
    for d in decodes:  # opens each D's control connection to P
        complete(d.base_url, make_prompt(8, seed=8), max_tokens=2)
    prompt = make_prompt(40, seed=4)
    want = greedy_text(reference, prompt, 200)
    client = redis_of(cluster)
    try:
        with Frozen(p):
            request = Background(stream_completion, entry.base_url, prompt, max_tokens=200)
            assert wait_until(
                lambda: any(metric(d, "splitwise_kv_blocks_used") > 0 for d in decodes), 60, 0.05
            )
            [victim] = [d for d in decodes if metric(d, "splitwise_kv_blocks_used") > 0]
            os.kill(victim.process.pid, signal.SIGTERM)
            assert wait_until(
                lambda: client.hget(keys.heartbeat(victim.name), "state") == "draining", 30, 0.05
            )
            hb = client.hgetall(keys.heartbeat(victim.name))
            assert hb["state_reason"] == "SIGTERM" and "signal" in hb["state_by"]
            members = [m for k in client.scan_iter(keys.prefix + "cand:*") for m in client.zrange(k, 0, -1)]
            assert not any(m.startswith(victim.name + "|") for m in members), members
            health = httpx.get(victim.base_url.removesuffix("/v1") + "/health", timeout=10)
            assert (health.status_code, health.json()) == (503, {"status": "draining"})
            out = cli(cluster, "inspect", "--json")
            [row] = [n for n in json.loads(out.stdout)["nodes"] if n["node_id"] == victim.name]
            assert row["state"] == "draining" and row["state_reason"] == "SIGTERM"
            assert victim.process.poll() is None  # still draining: the request waits for P
    finally:
        client.close()
    got = request.result()
    assert isinstance(got, StreamedCompletion)
    assert got.done and got.text == want and got.usage["completion_tokens"] == 200
    assert victim.process.wait(timeout=120) == 0, cluster.log_tail(victim)
    text = log_text(victim)
    assert '"finished_in_place": 1' in text and '"handed_back": 0' in text, cluster.log_tail(victim, 60)
    # Finished where it ran: never re-dispatched, never failed.
    if victim is not entry:
        assert metric(entry, "splitwise_scheduler_frontend_events_total", event="redispatched") == 0


def test_drain_of_an_unknown_node_is_a_clear_error(redis_server: RedisServer) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "splitwise.cli",
            "drain",
            "nosuch",
            "--scheduler-host",
            redis_server.host,
            "--scheduler-port",
            str(redis_server.port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "node 'nosuch' is not registered" in out.stderr
