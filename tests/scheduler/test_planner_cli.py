"""`splitwise planner` and `splitwise up --planner` as real processes: flag errors name the flag,
and a running planner reports to Redis and serves its /metrics."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from scheduler_support import REPO_ROOT

from scheduler.config import SchedulerConfig
from scheduler.connection import make_sync_client
from scheduler.keys import KeySchema
from splitwise.testing.redis_server import free_port

SPLITWISE = str(Path(sys.executable).with_name("splitwise"))


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["planner", "--ttft-slo-ms", "0"], "--ttft-slo-ms"),
        (["planner", "--min-decode", "3", "--max-decode", "2"], "--min-decode/--max-decode"),
        (["planner", "--planner-interval-s", "0"], "--planner-interval-s"),
        (["up", "--planner", "--prefill", "3", "--max-prefill", "2"], "--max-prefill"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(args: list[str], flag: str) -> None:
    proc = subprocess.run([SPLITWISE, *args], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert proc.returncode == 2, proc.stderr
    assert flag in proc.stderr


def test_planner_process_reports_and_serves_metrics(config: SchedulerConfig) -> None:
    port = free_port()
    args = [SPLITWISE, "planner", "--scheduler-port", str(config.scheduler_port)]
    args += ["--scheduler-topic", config.scheduler_topic, "--planner-interval-s", "0.2"]
    args += ["--planner-metrics-port", str(port)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO_ROOT)
    client = make_sync_client(config)
    keys = KeySchema(config.scheduler_topic)
    try:
        deadline = time.monotonic() + 60
        state: dict[bytes, bytes] = {}
        while time.monotonic() < deadline and not state:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            state = client.hgetall(keys.planner_state)
            time.sleep(0.1)
        assert state[b"decision"] == b"hold"
        assert state[b"reason"].startswith(b"prefill nodes 0 < --min-prefill 1")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:  # noqa: S310
            text = resp.read().decode()
        assert 'splitwise_planner_decisions_total{kind="hold"}' in text
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        client.close()
