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
