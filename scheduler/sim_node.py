"""A simulated node (no model) for tests and the benchmark: answers each request instantly (or with a
fixed per-token delay) with deterministic fake tokens, through the real NodeAgent.

Run as a real process so tests can kill it mid-request::

    python -m scheduler.sim_node --node-id d0 --role decode --scheduler-port 6390 --token-delay-ms 50

It prints ``READY <node_id>`` on stdout once registered. In disaggregated mode the simulated decode
node releases its prefill peer's booking itself (a real D learns that from P over pd-comm).
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from scheduler.config import SchedulerConfig, scheduler_options
from scheduler.errors import SchedulerError
from scheduler.messages import Finished, KVGeometry, NodeInfo, TokenChunk, WorkItem
from scheduler.node import NodeAgent
from splitwise.codes import Protocol, Role
from splitwise.endpoint import Endpoint
from splitwise.logging import get_logger

log = get_logger("scheduler.sim_node")

DEFAULT_KV = KVGeometry(dtype="bfloat16", block_size=16, num_layers=2, num_kv_heads=2, head_dim=64)


def sim_token(prompt_token_ids: list[int], index: int) -> int:
    """The token a simulated node emits at completion position ``index`` (the same on every node,
    so a resumed request's full output can be checked exactly)."""
    return (sum(prompt_token_ids) * 31 + index * 7 + 1) % 32_000


@dataclass(frozen=True)
class SimBehavior:
    num_tokens: int | None = None  # None: the request's max_tokens; set: this many, whatever it asks
    token_delay_s: float = 0.0
    chunk_tokens: int = 1


class SimNode:
    """Serves a NodeAgent's work with fake tokens. ``served`` counts work items per req_id (tests)."""

    def __init__(self, agent: NodeAgent, behavior: SimBehavior = SimBehavior()) -> None:
        self.agent = agent
        self.behavior = behavior
        self.served: Counter[str] = Counter()
        self.prompt_tokens_served = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """receive -> serve (concurrently), until the agent closes."""
        while True:
            try:
                work = await self.agent.next_work()
            except SchedulerError as exc:
                log.info("sim_node_stopping", reason=str(exc))
                return
            self.served[work.req_id] += 1
            self.prompt_tokens_served += len(work.prompt_token_ids)
            task = asyncio.create_task(self.serve(work))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def serve(self, work: WorkItem) -> None:
        agent, b = self.agent, self.behavior
        try:
            if work.assignment.mode == "disagg":  # a real D learns this from P over pd-comm
                await agent.mark(work.req_id, "transferred", detail=str(work.assignment.protocol))
            await agent.mark(work.req_id, "decoding")
            total = work.sampling_params.max_tokens if b.num_tokens is None else b.num_tokens
            index = len(work.resume_token_ids)
            while index < total:
                if agent.is_cancelled(work.req_id, work.attempt):
                    log.info("sim_request_cancelled", req_id=work.req_id)
                    await agent.ack(work)
                    return
                if b.token_delay_s:
                    await asyncio.sleep(b.token_delay_s)
                ids = [
                    sim_token(work.prompt_token_ids, i)
                    for i in range(index, min(total, index + b.chunk_tokens))
                ]
                await agent.publish(
                    TokenChunk(
                        req_id=work.req_id,
                        attempt=work.attempt,
                        index=index,
                        token_ids=ids,
                        logprobs=[-0.5] * len(ids),
                    )
                )
                index += len(ids)
            await agent.publish(
                Finished(
                    req_id=work.req_id,
                    attempt=work.attempt,
                    finish_reason="length",
                    prompt_tokens=len(work.prompt_token_ids),
                    completion_tokens=total,
                )
            )
            await agent.ack(work)
        except SchedulerError as exc:
            log.warning("sim_request_failed", req_id=work.req_id, error=str(exc))
            agent.stats.inc("sim_failures")

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def make_node_info(
    node_id: str,
    role: str,
    *,
    host: str = "127.0.0.1",
    model_id: str = "sim-model",
    kv: KVGeometry = DEFAULT_KV,
    protocols: list[str] | None = None,
    pd_comm_port: int = 0,
    http_port: int = 0,
) -> NodeInfo:
    protocols = protocols or ["ipc", "rdma", "tcp"]
    typed = [Protocol(p) for p in protocols]
    endpoints = {p: Endpoint(protocol=p, host=host, port=7000 + i, geometry=kv) for i, p in enumerate(typed)}
    return NodeInfo(
        node_id=node_id,
        role=Role(role),
        host=host,
        http_port=http_port,
        pd_comm_port=pd_comm_port,
        model_id=model_id,
        kv=kv,
        transfer_protocols=typed,
        transfer_endpoints=endpoints,
    )


def config_args(config: SchedulerConfig) -> list[str]:
    """The command-line flags that rebuild ``config``'s Redis address, topic and lease."""
    args = [
        "--scheduler-host",
        config.scheduler_host,
        "--scheduler-port",
        str(config.scheduler_port),
        "--scheduler-topic",
        config.scheduler_topic,
        "--scheduler-heartbeat-interval",
        str(config.heartbeat_interval_s),
        "--scheduler-dead-after-missed",
        str(config.dead_after_missed),
        "--disagg-min-prefill-tokens",
        str(config.disagg_min_prefill_tokens),
        "--disagg-max-prefill-queue",
        str(config.disagg_max_prefill_queue),
        "--kv-overlap-weight-prefill",
        str(config.kv_overlap_weight_prefill),
        "--kv-overlap-weight-decode",
        str(config.kv_overlap_weight_decode),
        "--kv-prefill-balance-tokens",
        str(config.kv_prefill_balance_tokens),
    ]
    if config.scheduler_cluster:
        args.append("--scheduler-cluster")
    if config.scheduler_sentinel:
        args += [
            "--scheduler-sentinel",
            config.scheduler_sentinel,
            "--scheduler-sentinel-service",
            config.scheduler_sentinel_service,
        ]
    return args


def spawn_module(
    module: str, args: list[str], ready: str, *, ready_timeout_s: float = 30.0
) -> tuple[subprocess.Popen[str], str]:
    """Start ``python -m module args`` as a real process; returns it once its first stdout line starts
    with ``ready`` (with that line), or kills it and raises if it exits or stays silent."""
    repo_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=repo_root)
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=repo_root,
    )
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], ready_timeout_s)
    line = proc.stdout.readline() if readable else f"<nothing within {ready_timeout_s} s>"
    if not line.startswith(ready):
        proc.kill()
        proc.wait()
        raise SchedulerError(f"{module} did not start: {line!r}")
    return proc, line.strip()


def spawn_sim_node(
    config: SchedulerConfig, node_id: str, role: str, *extra: str, ready_timeout_s: float = 30.0
) -> subprocess.Popen[str]:
    """Start ``python -m scheduler.sim_node`` as a real process (tests SIGKILL it) against
    ``config``'s Redis and topic; returns once it printed ``READY <node_id>``."""
    args = ["--node-id", node_id, "--role", role, *config_args(config), *extra]
    proc, _line = spawn_module(
        "scheduler.sim_node", args, f"READY {node_id}", ready_timeout_s=ready_timeout_s
    )
    return proc


async def _main(config: SchedulerConfig, info: NodeInfo, behavior: SimBehavior) -> None:
    agent = NodeAgent(config)
    await agent.start(info)
    node = SimNode(agent, behavior)
    print(f"READY {info.node_id}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(node.run())
    await stop.wait()
    await node.stop()
    await agent.close()
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)


@click.command()
@scheduler_options
@click.option("--node-id", required=True)
@click.option("--role", type=click.Choice(["mixed", "prefill", "decode"]), required=True)
@click.option("--host", default="127.0.0.1")
@click.option("--model-id", default="sim-model")
@click.option("--protocols", default="ipc,rdma,tcp", help="--cache-transfer-protocol preference list.")
@click.option("--num-tokens", type=int, default=None, help="Default: each request's max_tokens.")
@click.option("--token-delay-ms", type=float, default=0.0)
def main(
    node_id: str,
    role: str,
    host: str,
    model_id: str,
    protocols: str,
    num_tokens: int | None,
    token_delay_ms: float,
    **options: Any,
) -> None:
    config = SchedulerConfig.from_options(options)
    info = make_node_info(node_id, role, host=host, model_id=model_id, protocols=protocols.split(","))
    asyncio.run(_main(config, info, SimBehavior(num_tokens=num_tokens, token_delay_s=token_delay_ms / 1000)))


if __name__ == "__main__":
    main()
