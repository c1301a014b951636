"""The planner's loop against a real redis-server: simulated nodes report load and latency through
their heartbeats, the planner reads them, decides with an injected clock, calls the actuator (a
recording fake: the real role switch is the role command's, tested in tests/instance) and leaves its
trail in Redis, which `splitwise inspect` shows."""

from __future__ import annotations

import asyncio
import dataclasses
import json

from scheduler_support import cluster, run
from test_inspect import _inspect
from test_keys_ttl import _audit

from scheduler.config import SchedulerConfig
from scheduler.connection import make_client, make_sync_client
from scheduler.keys import KeySchema
from scheduler.messages import LoadReport
from scheduler.node import NodeAgent
from scheduler.sim_node import DEFAULT_KV, make_node_info
from splitwise.codes import Role
from splitwise.planner.loop import Planner, PlannerMetrics
from splitwise.planner.policy import Kind, PolicyConfig
from splitwise.planner.signals import read_signals


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def monotonic(self) -> float:
        return self.now_s

    def time_ms(self) -> int:
        return 1_700_000_000_000 + int(self.now_s * 1000)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class RecordingActuator:
    def __init__(self, *, fail: bool = False) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.fail = fail

    def switch(self, node_id: str, role: Role, *, reason: str) -> None:
        self.calls.append(("switch", node_id, role.value))
        if self.fail:
            raise ConnectionError("node unreachable")

    def add(self, role: Role, *, reason: str) -> str:
        self.calls.append(("add", "", role.value))
        return f"{role}-9"

    def remove(self, node_id: str, *, reason: str) -> None:
        self.calls.append(("remove", node_id, ""))


KV = dataclasses.replace(DEFAULT_KV, num_blocks=100)
PROMPT_HEAVY = {
    "p0": LoadReport(queued_prefill_tokens=6000),
    "d0": LoadReport(running_requests=3, free_kv_blocks=90, ttft_p90_ms=2500, latency_samples=12),
    "d1": LoadReport(running_requests=1, free_kv_blocks=80, ttft_p90_ms=2200, latency_samples=9),
}
POLICY = PolicyConfig(ttft_slo_ms=1000, itl_slo_ms=100, prefill_tokens_high=2000, sustain_s=5, cooldown_s=10)


async def _start_nodes(config: SchedulerConfig, loads: dict[str, LoadReport]) -> list[NodeAgent]:
    agents = []
    for node_id, load in loads.items():
        agent = NodeAgent(config, load_provider=lambda load=load: load)  # type: ignore[misc]
        role = "prefill" if node_id.startswith("p") else "decode"
        await agent.start(make_node_info(node_id, role, kv=KV))
        agents.append(agent)
    return agents


def _wait_reported(planner_client: object, keys: KeySchema, count: int) -> None:
    import time

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        signals = read_signals(planner_client, keys)  # type: ignore[arg-type]
        if len(signals.nodes) == count and all(
            n.latency_samples or n.role == Role.PREFILL for n in signals.nodes
        ):
            if signals.of(Role.PREFILL)[0].queued_prefill_tokens:
                return
        time.sleep(0.05)
    raise AssertionError("the nodes' load reports never reached Redis")


def test_prompt_heavy_load_switches_the_idlest_decode_and_leaves_a_trail(config: SchedulerConfig) -> None:
    keys = KeySchema(config.scheduler_topic)

    async def body() -> None:
        async with cluster(config):
            agents = await _start_nodes(config, PROMPT_HEAVY)
            client = make_sync_client(config)
            try:
                await asyncio.to_thread(_wait_reported, client, keys, 3)
                signals = read_signals(client, keys)
                d1 = next(n for n in signals.nodes if n.node_id == "d1")
                assert (d1.ttft_p90_ms, d1.latency_samples, d1.running_requests, d1.kv_usage) == (
                    2200,
                    9,
                    1,
                    0.2,
                )
                clock, actuator, metrics = FakeClock(), RecordingActuator(), PlannerMetrics()
                planner = Planner(
                    client, keys, POLICY, actuator, clock=clock, metrics=metrics, planner_id="pl-1"
                )
                first = await asyncio.to_thread(planner.step)
                assert first.kind == Kind.HOLD and first.reason.startswith(
                    "prefill pressed for 0s < sustain 5s"
                )
                clock.now_s += 5
                move = await asyncio.to_thread(planner.step)
                assert move.kind == Kind.TO_PREFILL and move.node_id == "d1"
                assert actuator.calls == [("switch", "d1", "prefill")]
                assert metrics.decisions.labels("to_prefill")._value.get() == 1
                assert metrics.decisions.labels("hold")._value.get() == 1

                entries = client.xrange(keys.planner)
                assert len(entries) == 1
                fields = {k.decode(): v.decode() for k, v in entries[0][1].items()}
                assert (fields["kind"], fields["node"], fields["target"], fields["outcome"]) == (
                    "to_prefill",
                    "d1",
                    "prefill",
                    "sent",
                )
                assert "ttft_p90 2500ms > slo 1000ms" in fields["reason"]
                assert json.loads(fields["signals"])["prompt_tokens_per_prefill"] == 6000
                assert 0 < client.pttl(keys.planner) and 0 < client.pttl(keys.planner_state)
                probe = make_client(config)
                try:
                    assert await _audit(probe, keys) == {}
                finally:
                    await probe.aclose()

                code, out, err = await _inspect(config, "--json")
                assert code == 0, err
                section = json.loads(out)["planner"]
                assert section["state"]["planner_id"] == "pl-1"
                assert section["state"]["decision"] == "to_prefill"
                assert section["state"]["signals"]["decode_nodes"] == 2
                assert [d["kind"] for d in section["decisions"]] == ["to_prefill"]
                code, text, err = await _inspect(config)
                assert code == 0, err
                assert "PLANNER" in text and "to_prefill" in text and "d1 -> prefill  sent" in text
                # a node leaving its role (the drain and role commands' heartbeat state) is not counted
                client.hset(keys.heartbeat("d0"), "state", "draining")
                assert [n.node_id for n in read_signals(client, keys).nodes] == ["d1", "p0"]
            finally:
                client.close()
                for agent in agents:
                    await agent.close()

    run(body(), timeout_s=60)


def test_a_failed_action_is_recorded_and_counted(config: SchedulerConfig) -> None:
    keys = KeySchema(config.scheduler_topic)

    async def body() -> None:
        async with cluster(config):
            agents = await _start_nodes(config, PROMPT_HEAVY)
            client = make_sync_client(config)
            try:
                await asyncio.to_thread(_wait_reported, client, keys, 3)
                clock, actuator = FakeClock(), RecordingActuator(fail=True)
                planner = Planner(client, keys, POLICY, actuator, clock=clock)
                await asyncio.to_thread(planner.step)
                clock.now_s += 6
                await asyncio.to_thread(planner.step)
                fields = {
                    k.decode(): v.decode() for k, v in client.xrevrange(keys.planner, count=1)[0][1].items()
                }
                assert fields["outcome"] == "failed: ConnectionError: node unreachable"
                assert planner.metrics.failures.labels("to_prefill")._value.get() == 1
            finally:
                client.close()
                for agent in agents:
                    await agent.close()

    run(body(), timeout_s=60)


def test_no_planner_running_shows_none(config: SchedulerConfig) -> None:
    async def body() -> None:
        async with cluster(config) as c:
            await c.add_node("d0", "decode")
            code, out, err = await _inspect(config, "--json")
            assert code == 0, err
            assert json.loads(out)["planner"] == {"state": None, "decisions": []}
            code, text, _ = await _inspect(config)
            assert "PLANNER  (none running)" in text

    run(body(), timeout_s=60)
