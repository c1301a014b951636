"""Fixtures for scheduler tests: a real redis-server (tests/conftest.py), fast heartbeats, and
in-process or subprocess simulated nodes."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

# This directory is named like the package it tests; with pytest's default (prepend) import mode
# tests/ lands on sys.path and would make ``scheduler`` resolve to this test directory.
REPO_ROOT = str(Path(__file__).resolve().parents[2])
if sys.path[0] != REPO_ROOT:
    sys.path.insert(0, REPO_ROOT)

from scheduler.config import SchedulerConfig  # noqa: E402
from scheduler.frontend import FrontendScheduler  # noqa: E402
from scheduler.messages import KVGeometry  # noqa: E402
from scheduler.node import NodeAgent  # noqa: E402
from scheduler.sim_node import DEFAULT_KV, SimBehavior, SimNode, make_node_info, spawn_sim_node  # noqa: E402
from scheduler.tasks import stop_tasks  # noqa: E402
from splitwise.testing.redis_server import RedisServer  # noqa: E402

T = TypeVar("T")
_topics = itertools.count()


def run(coro: Awaitable[T], timeout_s: float = 30.0) -> T:
    """Run one async test body with an upper bound (a hang is a failure, not a stuck CI job)."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))  # type: ignore[arg-type]


@pytest.fixture()
def config(redis_server: RedisServer) -> SchedulerConfig:
    return SchedulerConfig(
        scheduler_port=redis_server.port,
        scheduler_topic=f"t{next(_topics)}",
        heartbeat_interval_s=0.1,
        block_ms=100,
        scheduler_ttl_s=30.0,
    )


@dataclass
class Cluster:
    """In-process simulated nodes and frontends sharing one config; closes everything on exit."""

    config: SchedulerConfig
    nodes: dict[str, SimNode] = field(default_factory=dict)
    frontends: list[FrontendScheduler] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def add_node(
        self,
        node_id: str,
        role: str,
        *,
        serve: bool = True,
        behavior: SimBehavior | None = None,
        model_id: str = "sim-model",
        kv: KVGeometry = DEFAULT_KV,
        host: str = "127.0.0.1",
        protocols: list[str] | None = None,
    ) -> SimNode:
        agent = NodeAgent(self.config)
        await agent.start(
            make_node_info(node_id, role, model_id=model_id, kv=kv, host=host, protocols=protocols)
        )
        sim = SimNode(agent, behavior or SimBehavior())
        self.nodes[node_id] = sim
        if serve and role != "prefill":
            self.tasks.append(asyncio.create_task(sim.run()))
        return sim

    async def add_frontend(self, **kwargs: Any) -> FrontendScheduler:
        kwargs.setdefault("model_id", "sim-model")
        fe = FrontendScheduler(self.config, **kwargs)
        await fe.start()
        self.frontends.append(fe)
        return fe

    async def close(self) -> None:
        for fe in self.frontends:
            await fe.close()
        for sim in self.nodes.values():
            await sim.stop()
            await sim.agent.close()
        await stop_tasks(self.tasks, grace_s=self.config.block_ms / 1000 + 1)


@asynccontextmanager
async def cluster(config: SchedulerConfig):  # type: ignore[no-untyped-def]
    c = Cluster(config)
    try:
        yield c
    finally:
        await c.close()


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll a cheap local predicate (test helper only; the library itself never polls)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def eventually(check: Callable[[], Awaitable[T]], expected: T, timeout_s: float = 10.0) -> T:
    """Re-run an async check until it returns ``expected`` (acks land just after terminal messages)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        got = await check()
        if got == expected or asyncio.get_running_loop().time() > deadline:
            return got
        await asyncio.sleep(0.02)


@dataclass
class SimProcess:
    node_id: str
    process: subprocess.Popen[str]

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture()
def sim_processes(config: SchedulerConfig) -> Iterator[Callable[..., SimProcess]]:
    """Start `python -m scheduler.sim_node` processes (real processes, so tests can SIGKILL them)."""
    started: list[SimProcess] = []

    def start(node_id: str, role: str, *extra: str) -> SimProcess:
        proc = spawn_sim_node(config, node_id, role, *extra)
        sp = SimProcess(node_id, proc)
        started.append(sp)
        return sp

    yield start
    for sp in started:
        sp.stop()


async def booked(fe: FrontendScheduler) -> dict[str, dict[str, int]]:
    """Outstanding bookings per node, from the bookings ZSET."""
    from scheduler.registry import booked_load

    assert fe._client is not None
    return await booked_load(fe._client, fe.keys)


def booked_prefill(load: dict[str, dict[str, int]]) -> dict[str, int]:
    return {n: v["prefill_tokens"] for n, v in load.items() if v["prefill_tokens"]}


def booked_decode(load: dict[str, dict[str, int]]) -> dict[str, int]:
    return {n: v["decode_requests"] for n, v in load.items() if v["decode_requests"]}


async def request_events(fe: FrontendScheduler, req_id: str) -> list[dict[str, str]]:
    """The request's recorded lifecycle ({t}:log), oldest first."""
    from scheduler.records import find_request

    assert fe._client is not None
    return await find_request(fe._client, fe.keys, req_id)


def dispatched_pair(events: list[dict[str, str]]) -> tuple[str, str]:
    """(prefill, decode) node of the last ``dispatched`` event."""
    detail = [e["detail"] for e in events if e["event"] == "dispatched"][-1]
    fields = dict(part.split("=", 1) for part in detail.split() if "=" in part)
    return fields["p"], fields["d"]
