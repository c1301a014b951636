"""The planner on real processes (#16): a 1P2D cluster of `splitwise serve` instances behind a
router, a sustained prompt-heavy load, and the planner loop (the one `splitwise planner` runs, with
the real role command as its actuator). It switches a decode node to prefill, the node flips in
place (same process), and every request of the load succeeds throughout.

The thresholds make the trigger independent of the machine's speed: any prompt in flight on the
prefill node presses prefill (--planner-prefill-tokens-high 1), the latency SLOs are out of reach
and KV usage cannot cross its bar, so decode is relaxed; sustain 0 acts on the first pressed look.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from scheduler.config import SchedulerConfig
from scheduler.connection import make_sync_client
from scheduler.keys import KeySchema
from scheduler.messages import NodeInfo, decode
from splitwise.codes import Role
from splitwise.planner.actuators import RoleSwitcher
from splitwise.planner.loop import Planner
from splitwise.planner.policy import PolicyConfig


def _roles(client: object, keys: KeySchema) -> dict[str, str]:
    raw = client.hgetall(keys.nodes)  # type: ignore[attr-defined]
    return {k.decode(): decode(v, NodeInfo).role.value for k, v in raw.items()}


def test_prompt_heavy_load_switches_a_decode_to_prefill(cluster_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip(
        "splitwise.commands.role", reason="the role command (drain + role switch, #16) is not here"
    )
    cluster = cluster_factory(num_prefill=1, num_decode=2, router=True)
    host, port = cluster.scheduler_address
    client = make_sync_client(
        SchedulerConfig(scheduler_host=host, scheduler_port=port, scheduler_topic="splitwise")
    )
    keys = KeySchema("splitwise")
    pids = {c.name: c.process.pid for c in cluster.children}
    policy = PolicyConfig(
        ttft_slo_ms=1e9,
        itl_slo_ms=1e9,
        prefill_tokens_high=1,
        kv_usage_high=1.0,
        max_prefill=2,
        min_decode=1,
        sustain_s=0,
        cooldown_s=1000,  # one move in this test
    )
    planner = Planner(client, keys, policy, RoleSwitcher(client, keys, grace_s=30), interval_s=0.2)
    stop_planner, stop_load = threading.Event(), threading.Event()
    results: list[tuple[int, str]] = []

    def load(worker: int) -> None:
        prompt = [10 + (worker * 7 + i) % 200 for i in range(200)]
        with httpx.Client(timeout=120) as http:
            n = 0
            while not stop_load.is_set():
                body = {"prompt": prompt, "max_tokens": 3, "temperature": 0.0, "ignore_eos": True}
                try:
                    resp = http.post(f"{cluster.entry.base_url}/completions", json=body)
                    ok = resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
                    results.append((resp.status_code, "" if ok else resp.text[:300]))
                except httpx.HTTPError as exc:
                    results.append((0, f"{type(exc).__name__}: {exc}"))
                n += 1
                prompt = [*prompt[1:], 10 + n % 200]  # a new prompt each time: no prefix-cache hit

    threads = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(3)]
    planner_thread = threading.Thread(target=planner.run, args=(stop_planner,), daemon=True)
    try:
        for t in threads:
            t.start()
        planner_thread.start()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and sorted(_roles(client, keys).values()).count("prefill") < 2:
            time.sleep(0.2)
        roles = _roles(client, keys)
        assert sorted(roles.values()) == ["decode", "prefill", "prefill"], roles
        entries = client.xrange(keys.planner)
        assert len(entries) == 1
        fields = {k.decode(): v.decode() for k, v in entries[0][1].items()}
        switched = fields["node"]
        assert (fields["kind"], fields["target"], fields["outcome"]) == ("to_prefill", "prefill", "sent")
        assert roles[switched] == Role.PREFILL and switched.startswith("decode-")
        # the load goes on through the new layout for a while: requests still succeed
        done = len(results)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(results) < done + 10:
            time.sleep(0.2)
    finally:
        stop_load.set()
        stop_planner.set()
        for t in threads:
            t.join(timeout=150)
        planner_thread.join(timeout=10)
        client.close()
    failures = [r for r in results if r[0] != 200 or r[1]]
    assert len(results) >= done + 10 and not failures, failures[:5]
    assert {c.name: c.process.pid for c in cluster.children} == pids  # switched in place
    assert all(c.process.poll() is None for c in cluster.children)


def test_up_planner_replaces_a_dead_decode_instance(tiny_model: Path, tmp_path: Path) -> None:
    """`splitwise up --planner`: the planner runs inside `up` and acts on its cluster. A decode
    instance killed leaves decode below --min-decode, so the planner starts a new one (decode-1),
    which serves."""
    import os
    import re
    import signal
    import subprocess
    import sys

    import redis

    out_path, err_path = tmp_path / "up.out", tmp_path / "up.err"
    args = [sys.executable, "-m", "splitwise.cli", "up", "--model", str(tiny_model), "--port", "0"]
    args += ["--planner", "--planner-interval-s", "0.3", "--max-decode", "2", "--planner-idle-s", "1000"]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    try:
        base_url, deadline = "", time.monotonic() + 240
        while not base_url:
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
            match = re.search(r"OpenAI base URL: (\S+)", out_path.read_text())
            base_url = match.group(1) if match else ""
            time.sleep(0.2)
        progress = err_path.read_text()
        assert "planner planner-" in progress
        redis_port = int(re.search(r"redis-server on 127\.0\.0\.1:(\d+)", progress).group(1))  # type: ignore[union-attr]
        client = redis.Redis(port=redis_port)
        keys = KeySchema("splitwise")
        decode_pid = next(  # our `up`'s own child only (other clusters may run on this machine)
            int(pid)
            for pid in os.listdir("/proc")
            if pid.isdigit() and _parent(pid) == proc.pid and b"decode-0" in _cmdline(pid)
        )
        os.kill(decode_pid, signal.SIGKILL)
        deadline = time.monotonic() + 240
        added: list[dict[str, str]] = []
        while time.monotonic() < deadline and not added:
            entries = client.xrange(keys.planner)
            added = [{k.decode(): v.decode() for k, v in f.items()} for _, f in entries]
            time.sleep(0.3)
        assert [(a["kind"], a["outcome"]) for a in added] == [("add_decode", "sent: started decode-1")], added
        assert added[0]["reason"] == "decode nodes 0 < --min-decode 1"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and _roles(client, keys).get("decode-1") != "decode":
            time.sleep(0.3)
        resp = httpx.post(
            f"{base_url}/completions", json={"prompt": "Hi", "max_tokens": 4, "ignore_eos": True}, timeout=120
        )
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4, resp.text
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, err_path.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # `up` stops its children; a SIGKILL would orphan them
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _parent(pid: str) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
