"""Conditional disaggregation on a real 1P1D cluster (``--disagg-min-prefill-tokens 16``):

- a prompt shorter than the limit is dispatched to D alone and prefilled there (P never sees it);
- a long prompt is handed off as usual;
- the next turn of that conversation, whose uncached part on D is below the limit because D's
  prefix cache holds the earlier turn, is prefilled on D by D's own choice;
- every answer is the greedy text of a mixed engine; each choice is counted in /metrics and shown by
  ``splitwise inspect --request``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from splitwise.cluster import LocalCluster
from splitwise.engine.config import EngineConfig
from splitwise.engine.engine import LLMEngine
from splitwise.engine.sampling_params import SamplingParams
from tests.instance.pd_helpers import make_prompt, metric, transfer_event


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


def complete_with_id(base_url: str, prompt: list[int], request_id: str) -> str:
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
    resp = httpx.post(f"{base_url}/completions", json=body, headers={"X-Request-Id": request_id}, timeout=120)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["choices"][0]["text"])


def inspect_request(cluster: LocalCluster, req_id: str) -> str:
    host, port = cluster.scheduler_address
    args = ["--scheduler-host", host, "--scheduler-port", str(port), "--scheduler-topic", cluster.spec.topic]
    out = subprocess.run(
        [sys.executable, "-m", "splitwise.cli", "inspect", *args, "--request", req_id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_short_and_mostly_cached_prompts_are_prefilled_on_the_decode_node(cluster_factory, reference) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(
        num_prefill=1, num_decode=1, transfer="tcp", scheduler_args=["--disagg-min-prefill-tokens", "16"]
    )
    [p] = [c for c in cluster.children if c.role == "prefill"]
    [d] = [c for c in cluster.children if c.role == "decode"]
    short, first_turn = make_prompt(10, seed=1), make_prompt(40, seed=2)
    second_turn = first_turn + make_prompt(6, seed=3)  # D caches the first turn's 10 full blocks
    for name, prompt in (("short", short), ("turn1", first_turn), ("turn2", second_turn)):
        assert complete_with_id(d.base_url, prompt, name) == greedy(reference, prompt, 6), name

    assert transfer_event(p, "prefills_shipped") == 1  # only the first turn was handed off
    assert transfer_event(d, "transfers_ok") == 1
    assert transfer_event(d, "local_prefills_cached") == 1
    frontend = "splitwise_scheduler_frontend_events_total"
    assert metric(d, frontend, event="dispatched_local_short_prompt") == 1
    assert "mode           local(short_prompt)" in inspect_request(cluster, "cmpl-short")
    assert "mode           disagg" in inspect_request(cluster, "cmpl-turn1")
    turn2 = inspect_request(cluster, "cmpl-turn2")
    assert "local prefill (6 uncached prompt tokens < --disagg-min-prefill-tokens 16)" in turn2
