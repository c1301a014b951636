"""A workload that shifts from prompt-heavy to output-heavy, served by a fixed P:D ratio and by the
same cluster with the planner, back to back in one run (#16).

    .venv/bin/python bench/planner_shift.py [--phase-s 60] [--prefill 2 --decode 2]
        [--rate-prompt 2 --rate-output 3] [--ttft-slo-ms 1500 --itl-slo-ms 150] [--out DIR]

Each setup is a real local cluster (redis-server, `splitwise serve` instances of the tiny test
model, a `splitwise router` as the entry, every request disaggregated). Phase 1 sends prompt-heavy
requests (--prompt-tokens long prompts, --prompt-phase-output tokens out) as Poisson arrivals at
--rate-prompt for --phase-s seconds; phase 2 starts right after and sends output-heavy requests
(--output-phase-prompt tokens in, --output-tokens out) at --rate-output. In the "planner" setup a
planner loop (splitwise/planner, the same one `splitwise planner` runs) watches Redis and switches
roles through the role command (drain, flip, re-register in the same process).

Per phase and setup: SLO attainment (TTFT: first token <= --ttft-slo-ms; ITL: a request's mean
inter-token latency, its TPOT, <= --itl-slo-ms; both), p50/p90 TTFT and ITL, request and output
token throughput, failures; and the planner's role moves with their time from the start of phase 1.
Both setups run on the same machine one after the other with the same seeds, so compare them as
ratios inside one run; a loaded machine moves both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitwise.bench.dataset import SampleRequest
from splitwise.bench.metrics import SLO, Distribution, RequestResult, compute_metrics
from splitwise.bench.serve_bench import LoadConfig, run_load, served_model_id
from splitwise.cluster import ClusterSpec, LocalCluster
from splitwise.engine.tiny_model import default_model_dir


def engine_args(args: argparse.Namespace) -> list[str]:
    return [
        *("--block-size", "16", "--transfer-timeout", "30"),
        *("--max-num-batched-tokens", str(args.max_batched_tokens), "--num-kv-blocks", str(args.kv_blocks)),
    ]


@dataclass(frozen=True)
class Phase:
    name: str
    prompt_tokens: int
    output_tokens: int
    rate: float


def workload(phase: Phase, duration_s: float, seed: int) -> list[SampleRequest]:
    rng = random.Random(seed)
    count = max(1, round(phase.rate * duration_s))
    # random token ids (no shared prefix: every prompt is computed in full)
    return [
        SampleRequest(
            [rng.randrange(10, 250) for _ in range(phase.prompt_tokens)],
            phase.prompt_tokens,
            phase.output_tokens,
        )
        for _ in range(count)
    ]


def phase_row(
    results: list[RequestResult], duration_s: float, ttft_slo_ms: float, itl_slo_ms: float
) -> dict[str, Any]:
    m = compute_metrics(results, max(duration_s, 1e-3), SLO(ttft_ms=ttft_slo_ms, tpot_ms=itl_slo_ms))
    n = max(1, len(results))
    ttft_ok = sum(1 for r in results if r.success and r.ttft_s is not None and r.ttft_s * 1000 <= ttft_slo_ms)
    itl_ok = sum(1 for r in results if r.success and (r.tpot_s is None or r.tpot_s * 1000 <= itl_slo_ms))
    tpot = Distribution.of_seconds([t for r in results if (t := r.tpot_s) is not None])
    return {
        "requests": len(results),
        "failed": m.num_failed,
        "ttft_slo_pct": 100 * ttft_ok / n,
        "itl_slo_pct": 100 * itl_ok / n,
        "both_slo_pct": 100 * (m.slo_attainment or 0.0),
        "ttft_p50_ms": m.ttft.p50_ms,
        "ttft_p90_ms": m.ttft.p90_ms,
        "itl_p50_ms": m.itl.p50_ms,
        "itl_p90_ms": m.itl.p90_ms,
        "tpot_p90_ms": tpot.p90_ms,
        "req_per_s": m.request_throughput,
        "out_tok_per_s": m.output_throughput,
        "errors": sorted({r.error for r in results if r.error})[:3],
    }


async def _drive(
    base_url: str, phases: list[Phase], phase_s: float, seed: int
) -> list[tuple[list[RequestResult], float]]:
    model = await served_model_id(base_url)

    def load(phase: Phase, i: int) -> LoadConfig:
        return LoadConfig(
            base_urls=(base_url,),
            model=model,
            request_rate=phase.rate,
            seed=seed + i,
            request_timeout_s=300,
            show_progress=False,
        )

    await run_load(load(phases[0], 99), workload(phases[0], 2 / phases[0].rate, seed - 1))  # warm-up

    async def phase_run(i: int) -> tuple[list[RequestResult], float]:
        await asyncio.sleep(i * phase_s)
        run = await run_load(load(phases[i], i), workload(phases[i], phase_s, seed + i))
        return run.results, run.metrics.duration_s

    return list(await asyncio.gather(*(phase_run(i) for i in range(len(phases)))))


def _planner_thread(
    cluster: LocalCluster, topic: str, args: argparse.Namespace, stop: threading.Event
) -> Any:
    from scheduler.config import SchedulerConfig
    from scheduler.connection import make_sync_client
    from scheduler.keys import KeySchema
    from splitwise.planner.actuators import ClusterActuator
    from splitwise.planner.loop import Planner
    from splitwise.planner.policy import PolicyConfig

    host, port = cluster.scheduler_address
    client = make_sync_client(
        SchedulerConfig(scheduler_host=host, scheduler_port=port, scheduler_topic=topic)
    )
    keys = KeySchema(topic)
    policy = PolicyConfig(
        ttft_slo_ms=args.ttft_slo_ms,
        itl_slo_ms=args.itl_slo_ms,
        prefill_tokens_high=args.prefill_tokens_high,
        sustain_s=args.sustain_s,
        cooldown_s=args.cooldown_s,
        reverse_cooldown_s=args.cooldown_s,
    )
    planner = Planner(
        client, keys, policy, ClusterActuator(client, keys, cluster, grace_s=20), interval_s=1.0
    )
    threading.Thread(target=planner.run, args=(stop,), daemon=True).start()
    return client, keys


def run_setup(setup: str, args: argparse.Namespace, phases: list[Phase]) -> dict[str, Any]:
    topic = f"shift-{setup}"
    spec = ClusterSpec(
        model=str(default_model_dir("tiny")),
        num_prefill=args.prefill,
        num_decode=args.decode,
        router=True,
        topic=topic,
        threads_per_instance=1,
        extra_args=engine_args(args),
        scheduler_args=["--disagg-min-prefill-tokens", "0"],
    )
    log_dir = args.out / "logs" / setup
    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(spec, log_dir=log_dir)
    stop = threading.Event()
    moves: list[dict[str, Any]] = []
    try:
        cluster.start()
        cluster.wait_ready(timeout_s=300)
        planner = _planner_thread(cluster, topic, args, stop) if setup == "planner" else None
        started_ms = time.time() * 1000
        outcomes = asyncio.run(_drive(cluster.entry.base_url, phases, args.phase_s, args.seed))
        if planner is not None:
            client, keys = planner
            for _id, fields in client.xrange(keys.planner):
                row = {k.decode(): v.decode() for k, v in fields.items()}
                row["t_s"] = round((int(row["ts_ms"]) - started_ms) / 1000, 1)
                moves.append({k: row[k] for k in ("t_s", "kind", "node", "target", "outcome", "reason")})
    finally:
        stop.set()
        cluster.stop()
    rows = {
        p.name: phase_row(res, dur, args.ttft_slo_ms, args.itl_slo_ms)
        for p, (res, dur) in zip(phases, outcomes, strict=True)
    }
    return {"setup": setup, "phases": rows, "moves": moves}


def _f(value: Any, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(records: list[dict[str, Any]]) -> str:
    head = "| phase | setup | reqs | failed | TTFT SLO % | ITL SLO % | both % | TTFT p50/p90 ms | ITL p50/p90 ms | req/s | out tok/s |"
    lines = [head, "|" + "---|" * 11]
    for phase in records[0]["phases"]:
        for rec in records:
            r = rec["phases"][phase]
            lines.append(
                f"| {phase} | {rec['setup']} | {r['requests']} | {r['failed']} | {_f(r['ttft_slo_pct'])} | {_f(r['itl_slo_pct'])} | "
                f"{_f(r['both_slo_pct'])} | {_f(r['ttft_p50_ms'])}/{_f(r['ttft_p90_ms'])} | {_f(r['itl_p50_ms'])}/{_f(r['itl_p90_ms'])} | "
                f"{_f(r['req_per_s'], '.2f')} | {_f(r['out_tok_per_s'], '.1f')} |"
            )
    for rec in records:
        if rec["setup"] == "planner":
            lines.append("\nplanner moves (t from the start of phase 1):")
            lines += [
                f"- t={m['t_s']}s {m['kind']} {m['node']} -> {m['target']} ({m['outcome']}): {m['reason']}"
                for m in rec["moves"]
            ] or ["- none"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--phase-s", type=float, default=60.0)
    parser.add_argument("--prefill", type=int, default=2)
    parser.add_argument("--decode", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=768)
    parser.add_argument("--prompt-phase-output", type=int, default=2)
    parser.add_argument("--output-phase-prompt", type=int, default=16)
    parser.add_argument("--output-tokens", type=int, default=96)
    parser.add_argument("--rate-prompt", type=float, default=2.0)
    parser.add_argument("--rate-output", type=float, default=3.0)
    parser.add_argument("--ttft-slo-ms", type=float, default=1500.0)
    parser.add_argument("--itl-slo-ms", type=float, default=150.0)
    parser.add_argument("--prefill-tokens-high", type=int, default=2048)
    parser.add_argument("--sustain-s", type=float, default=5.0)
    parser.add_argument("--cooldown-s", type=float, default=10.0)
    parser.add_argument("--max-batched-tokens", type=int, default=128)
    parser.add_argument("--kv-blocks", type=int, default=512)
    parser.add_argument("--setups", default="fixed,planner")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("/tmp/planner_shift"))
    args = parser.parse_args()
    phases = [
        Phase("1 prompt-heavy", args.prompt_tokens, args.prompt_phase_output, args.rate_prompt),
        Phase("2 output-heavy", args.output_phase_prompt, args.output_tokens, args.rate_output),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    records = [run_setup(setup, args, phases) for setup in args.setups.split(",")]
    table = markdown(records)
    (args.out / "planner_shift.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "records": records}, indent=2)
    )
    (args.out / "planner_shift.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
