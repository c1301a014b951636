"""Dispatch throughput and added latency of the Redis scheduler (a script, not a test).

For 1, 4 and 16 frontends and 2 to 64 simulated nodes (half prefill, half decode; they answer
instantly with one token), runs a closed loop of requests and prints requests/s and latency
percentiles next to the raw Redis PING round trip measured in the same run:

    .venv/bin/python bench/scheduler_dispatch.py [--requests 400] [--inflight-per-frontend 8]

submit_ms: FrontendScheduler.submit() (pick + book + enqueue: 2 round trips).
e2e_ms:    submit -> terminal message with an instant node, i.e. everything the scheduler adds
           (dispatch, XREADGROUP wake-up, 2 results, ack) for a 1-token request.
The simulated nodes run in one child process; frontends run in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scheduler.config import SchedulerConfig  # noqa: E402
from scheduler.connection import make_client  # noqa: E402
from scheduler.frontend import FrontendScheduler  # noqa: E402
from scheduler.messages import Finished, SubmitRequest  # noqa: E402
from scheduler.node import NodeAgent  # noqa: E402
from scheduler.sim_node import SimBehavior, SimNode, make_node_info  # noqa: E402
from splitwise.logging import configure_logging  # noqa: E402
from splitwise.testing.redis_server import RedisServer  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def serve_nodes(config: SchedulerConfig, num_nodes: int) -> None:
    """Child process: num_nodes simulated nodes until SIGTERM."""
    roles = ["prefill" if i % 2 == 0 else "decode" for i in range(num_nodes)]
    sims = []
    for i, role in enumerate(roles):
        agent = NodeAgent(config)
        await agent.start(make_node_info(f"{role[0]}{i}", role))
        sims.append(SimNode(agent, SimBehavior(num_tokens=1)))
    tasks = [asyncio.create_task(s.run()) for s in sims if s.agent.info.role != "prefill"]
    print("READY", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await asyncio.gather(*(s.agent.close() for s in sims))
    for t in tasks:
        t.cancel()


async def ping_rtt_ms(config: SchedulerConfig, n: int = 300) -> tuple[float, float]:
    client = make_client(config)
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await client.ping()
        samples.append((time.perf_counter() - start) * 1000)
    await client.aclose()
    return statistics.median(samples), pct(samples, 0.99)


async def run_case(
    config: SchedulerConfig, num_frontends: int, total: int, inflight: int
) -> dict[str, float]:
    fes = [FrontendScheduler(config, model_id="sim-model") for _ in range(num_frontends)]
    for fe in fes:
        await fe.start()
    submit_ms: list[float] = []
    e2e_ms: list[float] = []
    counter = iter(range(total))
    failures = 0

    async def worker(fe: FrontendScheduler) -> None:
        nonlocal failures
        for i in counter:
            start = time.perf_counter()
            stream = await fe.submit(
                SubmitRequest(req_id=f"b{i}", prompt_token_ids=[1] * 32, sampling_params={"max_tokens": 1})
            )
            submit_ms.append((time.perf_counter() - start) * 1000)
            msgs = await stream.collect()
            e2e_ms.append((time.perf_counter() - start) * 1000)
            failures += not isinstance(msgs[-1], Finished)

    start = time.perf_counter()
    await asyncio.gather(*(worker(fe) for fe in fes for _ in range(inflight)))
    elapsed = time.perf_counter() - start
    for fe in fes:
        await fe.close()
    return {
        "req_s": total / elapsed,
        "submit_p50": statistics.median(submit_ms),
        "submit_p99": pct(submit_ms, 0.99),
        "e2e_p50": statistics.median(e2e_ms),
        "e2e_p99": pct(e2e_ms, 0.99),
        "failures": failures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400, help="requests per case")
    parser.add_argument("--inflight-per-frontend", type=int, default=8)
    parser.add_argument("--frontends", default="1,4,16")
    parser.add_argument("--nodes", default="2,8,64")
    parser.add_argument("--serve-nodes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure_logging("ERROR", json=True)
    if args.serve_nodes:
        config = SchedulerConfig(scheduler_port=args.port, scheduler_topic=args.topic, block_ms=500)
        asyncio.run(serve_nodes(config, args.serve_nodes))
        return

    server = RedisServer().start()
    print(
        f"redis-server {server.port}; {os.cpu_count()} CPUs; {args.requests} requests per case, "
        f"{args.inflight_per_frontend} in flight per frontend; 1-token requests, instant simulated nodes"
    )
    print(
        f"{'frontends':>9} {'nodes':>5} {'req/s':>8} {'submit p50':>10} {'p99':>7} {'e2e p50':>8} {'p99':>7} "
        f"{'PING p50':>8} {'p99':>6}  (ms)"
    )
    try:
        for num_nodes in [int(n) for n in args.nodes.split(",")]:
            for num_frontends in [int(f) for f in args.frontends.split(",")]:
                topic = f"bench{num_nodes}x{num_frontends}"
                config = SchedulerConfig(scheduler_port=server.port, scheduler_topic=topic, block_ms=500)
                child = subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--serve-nodes",
                        str(num_nodes),
                        "--port",
                        str(server.port),
                        "--topic",
                        topic,
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                    stderr=subprocess.DEVNULL,
                )
                assert child.stdout is not None and child.stdout.readline().strip() == "READY"
                try:
                    ping = asyncio.run(ping_rtt_ms(config))
                    r = asyncio.run(
                        run_case(config, num_frontends, args.requests, args.inflight_per_frontend)
                    )
                finally:
                    child.send_signal(signal.SIGTERM)
                    try:
                        child.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        child.kill()
                        child.wait()
                print(
                    f"{num_frontends:>9} {num_nodes:>5} {r['req_s']:>8.0f} {r['submit_p50']:>10.2f} "
                    f"{r['submit_p99']:>7.2f} {r['e2e_p50']:>8.2f} {r['e2e_p99']:>7.2f} {ping[0]:>8.3f} "
                    f"{ping[1]:>6.3f}" + (f"  FAILURES {r['failures']}" if r["failures"] else ""),
                    flush=True,
                )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
