"""Scheduler at scale: the current scheduler and the one at a reference commit, side by side, on one
real redis-server (a script, not a test).

Issue #12's figures, in one run::

    .venv/bin/python bench/scheduler_dispatch.py --nodes 2,32,512 --rounds 3 --requests 1000

For each node count (default 2, 8, 32, 128, 512 simulated nodes: half prefill, half decode, many
per process, answering each request instantly with one token) and each implementation, in
interleaved rounds (old, new, then new, old, ...):

  latency phase   one request in flight: dispatch p50/p99 (``submit()``: pick + book + enqueue)
                  and 1-token round trip p50/p99 (submit -> terminal message)
  throughput phase ``--inflight`` requests in flight from one frontend: dispatches/s
  both phases     Redis commands per request (``INFO commandstats``, every command of every
                  client, heartbeats and script internals included) and Redis CPU per request
  throughput phase client CPU per request of the frontend process and of the node-host processes
                  (utime + stime from /proc/<pid>/stat, every thread, idle background included)

then a paired latency phase (this checkout only, skipped with ``--pair-samples 0``): the smallest
and the largest node count live at once on the same server, single requests alternating between
their two frontends, so the p50 ratio of the two sizes is measured at the same moments of a
shared, noisy machine (separate cases run seconds apart, and the machine's load moves between them).

It prints one table with what the issue's done-when asks: per node count the machine's load
average, dispatches/s old / new and their ratio, dispatch p50 old / new and new's p50 over new's
p50 at the smallest count, commands per request old / new; then the detail table, then the paired
p50 ratio. Options: [--nodes 2,8,32,128,512] [--rounds 2] [--reference c5d8111] [--requests 2000]
[--inflight 32] [--impls old,new] [--pair-samples 400].

The reference implementation is the ``scheduler`` package at ``--reference``, extracted with
``git archive`` into a temporary directory at run time (never committed) and put first on the
child processes' PYTHONPATH; ``splitwise`` (logging, codec) comes from this checkout for both.
Every measurement runs in child processes: a node host per 64 nodes and one frontend driver.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scheduler_dispatch_procs import (  # noqa: E402 - this script's folder (run as a script)
    IMPL_ENV,
    ROOT,
    child,
    extract_reference,
    run_pair,
    run_paired_throughput,
    start_hosts,
    stop_hosts,
)
from scheduler_dispatch_report import print_table  # noqa: E402


def _import_path() -> None:
    impl = os.environ.get(IMPL_ENV)
    sys.path.insert(0, str(ROOT))
    if impl:
        sys.path.insert(0, impl)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- children ------------------------------------------------------------------------------------
async def serve_nodes(port: int, topic: str, first: int, count: int, total: int) -> None:
    """Node host: ``count`` simulated nodes (ids first..first+count) until SIGTERM."""
    from scheduler.config import SchedulerConfig
    from scheduler.node import NodeAgent
    from scheduler.sim_node import SimBehavior, SimNode, make_node_info

    config = SchedulerConfig(scheduler_port=port, scheduler_topic=topic)
    sims = []
    for i in range(first, first + count):
        role = "prefill" if i % 2 == 0 else "decode"
        agent = NodeAgent(config)
        await agent.start(make_node_info(f"{role[0]}{i}", role))
        sims.append(SimNode(agent, SimBehavior(num_tokens=1)))
    tasks = [asyncio.create_task(s.run()) for s in sims if s.agent.info.role != "prefill"]
    print("READY", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await asyncio.gather(*(s.agent.close() for s in sims), return_exceptions=True)
    for t in tasks:
        t.cancel()


async def redis_counters(client: Any) -> tuple[int, float]:
    """(total commands executed, Redis CPU seconds) so far."""
    stats = await client.info("commandstats")
    calls = sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_"))
    cpu = await client.info("cpu")
    return calls, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


async def script_usec(client: Any) -> tuple[int, float]:
    """(EVALSHA calls, server-side microseconds in them) so far: what the scripts cost inside Redis,
    independent of round trips and of CPU contention on the client side."""
    stats = (await client.info("commandstats")).get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), float(stats.get("usec", 0))


def process_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (all their threads), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / ticks


async def drive(
    port: int, topic: str, num_nodes: int, requests: int, inflight: int, host_pids: list[int]
) -> dict[str, float]:
    """Frontend driver: the latency phase, then the throughput phase; prints one JSON line."""
    import redis.asyncio as aioredis

    from scheduler.config import SchedulerConfig
    from scheduler.frontend import FrontendScheduler
    from scheduler.messages import Finished, SubmitRequest
    from splitwise.engine.sampling_params import SamplingParams

    config = SchedulerConfig(scheduler_port=port, scheduler_topic=topic)
    probe = aioredis.Redis(port=port)
    fe = FrontendScheduler(config, model_id="sim-model")
    await fe.start()
    # Both implementations keep their view in ``_view``; the old one refreshes with ``_refresh_view``.
    refresh = getattr(fe, "_refresh_view", None) or fe._monitor.refresh_view
    deadline = time.monotonic() + 60
    while len(fe._view.nodes) < num_nodes and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        await refresh()
    seq = iter(range(10**9))
    failures = 0
    # The reference commit's SubmitRequest took sampling params as a plain map.
    typed = "SamplingParams" in str(SubmitRequest.__dataclass_fields__["sampling_params"].type)
    params: Any = SamplingParams(max_tokens=1) if typed else {"max_tokens": 1}

    async def one() -> tuple[float, float]:
        nonlocal failures
        start = time.perf_counter()
        stream = await fe.submit(
            SubmitRequest(
                req_id=f"b{next(seq)}",
                prompt_token_ids=[1] * 32,
                sampling_params=params,
            )
        )
        dispatched = time.perf_counter()
        msgs = await stream.collect()
        failures += not isinstance(msgs[-1], Finished)
        return (dispatched - start) * 1000, (time.perf_counter() - start) * 1000

    for _ in range(50):  # warm-up: connections, scripts, caches
        await one()
    n_latency = max(100, requests // 8)
    # Background: what heartbeats and idle reads cost per second with no request in flight.
    idle0, t_idle0 = (await redis_counters(probe))[0], time.perf_counter()
    await asyncio.sleep(2.0)
    idle1, t_idle1 = (await redis_counters(probe))[0], time.perf_counter()
    background_s = (idle1 - idle0 - 2) / (t_idle1 - t_idle0)
    calls0, cpu0 = await redis_counters(probe)
    scripts0 = await script_usec(probe)
    t0 = time.perf_counter()
    samples = [await one() for _ in range(n_latency)]
    latency_s = time.perf_counter() - t0
    calls1, cpu1 = await redis_counters(probe)
    scripts1 = await script_usec(probe)
    me = [os.getpid()]
    fe_cpu1, nodes_cpu1 = process_cpu_s(me), process_cpu_s(host_pids)

    done: list[tuple[float, float]] = []
    counter = iter(range(requests))

    async def worker() -> None:
        for _ in counter:
            done.append(await one())

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    elapsed = time.perf_counter() - start
    calls2, cpu2 = await redis_counters(probe)
    fe_cpu2, nodes_cpu2 = process_cpu_s(me), process_cpu_s(host_pids)
    await fe.close()
    await probe.aclose()
    dispatch = [d for d, _ in samples]
    rtt = [r for _, r in samples]
    return {
        "dispatch_p50": statistics.median(dispatch),
        "dispatch_p99": pct(dispatch, 0.99),
        "rtt_p50": statistics.median(rtt),
        "rtt_p99": pct(rtt, 0.99),
        "cmds_req_1": (calls1 - calls0 - 2) / n_latency,
        "req_cmds_1": (calls1 - calls0 - 2 - background_s * latency_s) / n_latency,
        "req_cmds_n": (calls2 - calls1 - 2 - background_s * elapsed) / requests,
        "background_cmds_s": background_s,
        "script_us": (scripts1[1] - scripts0[1]) / max(1, scripts1[0] - scripts0[0]),
        "cpu_ms_req_1": (cpu1 - cpu0) * 1000 / n_latency,
        "dispatch_s": requests / elapsed,
        "cmds_req_n": (calls2 - calls1 - 2) / requests,
        "cpu_ms_req_n": (cpu2 - cpu1) * 1000 / requests,
        "fe_cpu_ms_req_n": (fe_cpu2 - fe_cpu1) * 1000 / requests,
        "nodes_cpu_ms_req_n": (nodes_cpu2 - nodes_cpu1) * 1000 / requests,
        "failures": failures,
    }


async def drive_pair(port: int, topics: list[str], sizes: list[int], samples: int) -> dict[str, float]:
    """Paired latency: one frontend per topic (each topic its own set of live nodes, all on one
    redis-server, all hosts running), single requests alternating between the topics (ABAB, the
    order swapped every pair), so both sizes see the same moment of a shared machine."""
    from scheduler.config import SchedulerConfig
    from scheduler.frontend import FrontendScheduler
    from scheduler.messages import Finished, SubmitRequest
    from splitwise.engine.sampling_params import SamplingParams

    fes = []
    for topic, n in zip(topics, sizes, strict=True):
        fe = FrontendScheduler(
            SchedulerConfig(scheduler_port=port, scheduler_topic=topic), model_id="sim-model"
        )
        await fe.start()
        deadline = time.monotonic() + 60
        while len(fe._view.nodes) < n and time.monotonic() < deadline:  # type: ignore[union-attr]
            await asyncio.sleep(0.2)
            await fe._monitor.refresh_view()  # type: ignore[union-attr]
        fes.append(fe)
    seq = iter(range(10**9))
    failures = 0

    async def one(fe: FrontendScheduler) -> float:
        nonlocal failures
        start = time.perf_counter()
        stream = await fe.submit(
            SubmitRequest(
                req_id=f"q{next(seq)}",
                prompt_token_ids=[1] * 32,
                sampling_params=SamplingParams(max_tokens=1),
            )
        )
        dispatched = time.perf_counter()
        failures += not isinstance((await stream.collect())[-1], Finished)
        return (dispatched - start) * 1000

    for _ in range(50):
        for fe in fes:
            await one(fe)
    got: list[list[float]] = [[] for _ in fes]
    for i in range(samples):
        order = list(range(len(fes))) if i % 2 == 0 else list(reversed(range(len(fes))))
        for j in order:
            got[j].append(await one(fes[j]))
    for fe in fes:
        await fe.close()
    out = {f"p50_{n}": statistics.median(g) for n, g in zip(sizes, got, strict=True)}
    out.update({f"p99_{n}": pct(g, 0.99) for n, g in zip(sizes, got, strict=True)})
    out["failures"] = failures
    return out


async def drive_bursts(port: int, topic: str, num_nodes: int, burst_s: float, inflight: int) -> None:
    """Throughput in bursts on command: after READY, each stdin line ``go`` runs ``inflight``
    requests in flight for ``burst_s`` seconds and prints {dispatch_s, failures}; ``stop`` ends."""
    from scheduler.config import SchedulerConfig
    from scheduler.frontend import FrontendScheduler
    from scheduler.messages import Finished, SubmitRequest
    from splitwise.engine.sampling_params import SamplingParams

    fe = FrontendScheduler(SchedulerConfig(scheduler_port=port, scheduler_topic=topic), model_id="sim-model")
    await fe.start()
    refresh = getattr(fe, "_refresh_view", None) or fe._monitor.refresh_view  # type: ignore[union-attr]
    deadline = time.monotonic() + 60
    while len(fe._view.nodes) < num_nodes and time.monotonic() < deadline:  # type: ignore[union-attr]
        await asyncio.sleep(0.2)
        await refresh()
    typed = "SamplingParams" in str(SubmitRequest.__dataclass_fields__["sampling_params"].type)
    params: Any = SamplingParams(max_tokens=1) if typed else {"max_tokens": 1}
    seq = iter(range(10**9))
    failures = 0

    async def one() -> None:
        nonlocal failures
        stream = await fe.submit(
            SubmitRequest(req_id=f"t{next(seq)}", prompt_token_ids=[1] * 32, sampling_params=params)
        )
        failures += not isinstance((await stream.collect())[-1], Finished)

    for _ in range(50):
        await one()
    print("READY", flush=True)

    async def worker(until: float) -> int:
        done = 0
        while time.perf_counter() < until:
            await one()
            done += 1
        return done

    while (await asyncio.to_thread(sys.stdin.readline)).strip() == "go":
        start = time.perf_counter()
        done = sum(await asyncio.gather(*(worker(start + burst_s) for _ in range(inflight))))
        elapsed = time.perf_counter() - start
        print(json.dumps({"dispatch_s": done / elapsed, "failures": failures}), flush=True)
    await fe.close()


# --- orchestrator ----------------------------------------------------------------------------------
def run_case(
    impl_dir: Path | None, port: int, topic: str, num_nodes: int, args: argparse.Namespace
) -> dict[str, float]:
    hosts: list[subprocess.Popen[str]] = []
    try:
        start_hosts(hosts, impl_dir, port, topic, num_nodes)
        driver = child(
            impl_dir,
            "--drive",
            str(port),
            topic,
            str(num_nodes),
            str(args.requests),
            str(args.inflight),
            ",".join(str(h.pid) for h in hosts),
            stderr=subprocess.PIPE,
        )
        out, err = driver.communicate(timeout=600)
        lines = out.strip().splitlines()
        if driver.returncode != 0 or not lines:
            raise RuntimeError(f"driver failed ({driver.returncode}): {err[-2000:]}")
        return dict(json.loads(lines[-1]))
    finally:
        stop_hosts(hosts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", default="2,8,32,128,512")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (old, new, old, new, ...)")
    parser.add_argument("--reference", default="c5d8111", help="commit of the 'old' scheduler")
    parser.add_argument("--requests", type=int, default=2000, help="requests in the throughput phase")
    parser.add_argument("--inflight", type=int, default=32, help="requests in flight in the throughput phase")
    parser.add_argument("--impls", default="old,new", help="which to run (new alone: no ratios)")
    parser.add_argument("--serve", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--drive", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--pair", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--bursts", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument(
        "--paired-bursts",
        type=int,
        default=6,
        help="paired throughput: bursts per implementation and node count, alternating (0: skip)",
    )
    parser.add_argument("--burst-s", type=float, default=3.0, help="paired throughput: seconds per burst")
    parser.add_argument(
        "--pair-samples", type=int, default=400, help="paired latency: requests per size (0: skip the phase)"
    )
    args = parser.parse_args()
    if args.serve or args.drive or args.pair or args.bursts:
        _import_path()
        from splitwise.logging import configure_logging

        configure_logging("ERROR", json=True)
        if args.bursts:
            port, topic, num_nodes, burst_s, inflight = args.bursts
            asyncio.run(drive_bursts(int(port), topic, int(num_nodes), float(burst_s), int(inflight)))
        elif args.pair:
            port, topics, pair_sizes, samples = args.pair
            paired = drive_pair(
                int(port), topics.split(","), [int(n) for n in pair_sizes.split(",")], int(samples)
            )
            print(json.dumps(asyncio.run(paired)))
        elif args.serve:
            port, topic, first, count, total = args.serve
            asyncio.run(serve_nodes(int(port), topic, int(first), int(count), int(total)))
        else:
            port, topic, num_nodes, requests, inflight, pids = args.drive
            host_pids = [int(p) for p in pids.split(",")]
            result = drive(int(port), topic, int(num_nodes), int(requests), int(inflight), host_pids)
            print(json.dumps(asyncio.run(result)))
        return

    sys.path.insert(0, str(ROOT))
    from splitwise.testing.redis_server import RedisServer

    tmp = Path(tempfile.mkdtemp(prefix="splitwise-bench-ref-"))
    server = RedisServer().start()
    subprocess.run(
        ["redis-cli", "-p", str(server.port), "CONFIG", "SET", "maxclients", "20000"], capture_output=True
    )
    try:
        impls = {"old": extract_reference(args.reference, tmp), "new": None}
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        sizes = [int(n) for n in args.nodes.split(",")]
        print(
            f"redis-server {server.port}; {os.cpu_count()} CPUs; old = scheduler@{args.reference}, new = this "
            f"checkout; {args.rounds} interleaved rounds; latency phase 1 in flight, throughput phase "
            f"{args.requests} requests {args.inflight} in flight; 1-token requests, instant nodes",
            flush=True,
        )
        for rnd in range(args.rounds):
            for n in sizes:
                order = ("old", "new") if rnd % 2 == 0 else ("new", "old")
                for name in (i for i in order if i in args.impls.split(",")):
                    topic = f"b{name}{n}r{rnd}"
                    r = run_case(impls[name], server.port, topic, n, args)
                    r["load_avg"] = os.getloadavg()[0]
                    results.setdefault((name, n), []).append(r)
                    print(
                        f"  round {rnd} {name:>3} {n:>4} nodes: {json.dumps({k: round(v, 3) for k, v in r.items()})}",
                        flush=True,
                    )
        if results:
            print_table(results, sizes)
        if args.paired_bursts and set(args.impls.split(",")) == {"old", "new"}:
            print(
                f"\npaired throughput: old and new live at once per node count, {args.paired_bursts} bursts of "
                f"{args.burst_s} s each, {args.inflight} in flight, alternating (old, new, new, old, ...)",
                flush=True,
            )
            print(
                "\n| nodes | load avg | dispatches/s old | new | new/old (median of burst pairs) | min | max |"
            )
            print("|---:|---:|---:|---:|---:|---:|---:|")
            for n in sizes:
                bursts = run_paired_throughput(
                    impls, server.port, n, args.paired_bursts, args.burst_s, args.inflight, "p"
                )
                ratios = [b["new"] / b["old"] for b in bursts]
                print(
                    f"| {n} | {statistics.median(b['load_avg'] for b in bursts):.1f} "
                    f"| {statistics.median(b['old'] for b in bursts):.0f} "
                    f"| {statistics.median(b['new'] for b in bursts):.0f} | x{statistics.median(ratios):.2f} "
                    f"| x{min(ratios):.2f} | x{max(ratios):.2f} |",
                    flush=True,
                )
        if args.pair_samples and len(sizes) > 1:
            pair_sizes = [sizes[0], sizes[-1]]
            print(
                f"\npaired dispatch latency (this checkout): {pair_sizes[0]} and {pair_sizes[-1]} nodes live at "
                f"once, {args.pair_samples} single requests each, alternating; load avg {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            pairs = [
                run_pair(server.port, pair_sizes, args.pair_samples, f"r{rnd}") for rnd in range(args.rounds)
            ]
            for rnd, pr in enumerate(pairs):
                print(f"  round {rnd}: {json.dumps({k: round(v, 3) for k, v in pr.items()})}", flush=True)
            lo, hi = (statistics.median(pr[f"p50_{n}"] for pr in pairs) for n in pair_sizes)
            print(
                f"  dispatch p50 {pair_sizes[0]} nodes {lo:.3f} ms, {pair_sizes[-1]} nodes {hi:.3f} ms: "
                f"ratio {hi / lo:.2f} (medians over {len(pairs)} rounds); load avg {os.getloadavg()[0]:.1f}"
            )
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
