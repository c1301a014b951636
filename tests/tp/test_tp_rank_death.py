"""Killing one rank of a serving instance mid-request: the request ends with an explicit error,
the instance exits non-zero, and no process of it is left. Real `splitwise serve` with TP=2."""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest

from splitwise.engine.tiny_model import default_model_dir
from tests.instance.helpers import start_cluster
from tests.tp.tp_support import is_alive, rank_pids

pytestmark = pytest.mark.slow


def test_killed_rank_fails_the_request_and_stops_the_instance() -> None:
    cluster = start_cluster(default_model_dir("tiny"), num_prefill=0, num_decode=0, num_mixed=1, decode_tp=2)
    try:
        child = cluster.entry
        (pid,) = rank_pids(child.log_file.read_text())
        body = {
            "prompt": [5, 6, 7],
            "max_tokens": 1500,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
        }
        events: list[dict[str, object]] = []
        with httpx.stream("POST", f"{child.base_url}/completions", json=body, timeout=120) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                events.append(json.loads(line[5:]))
                if len(events) == 3:  # mid-decode: tokens are flowing
                    os.kill(pid, signal.SIGKILL)
        errors = [e for e in events if "error" in e]
        assert errors, events[-3:]
        assert "engine lost" in json.dumps(errors[-1]) and "tensor-parallel rank" in json.dumps(errors[-1])
        assert child.process.wait(timeout=60) == 1
        assert not is_alive(pid)
        assert "stopping the instance: its engine is lost" in child.log_file.read_text()
    finally:
        cluster.stop()
