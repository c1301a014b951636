"""A rolling restart of a 2P2D cluster under continuous streaming load (a script, not a test).

Starts redis-server, 2 prefill + 2 decode instances of the built-in tiny model and a router
(splitwise.cluster.LocalCluster), computes each prompt's greedy reference in-process, runs N
streaming clients through the router, and restarts every instance one at a time (SIGTERM: it
drains; wait for exit 0; start it again with the same flags). Prints the counts:

    .venv/bin/python bench/rolling_restart.py [--clients 3] [--max-tokens 48] [--grace 120] [--transfer ipc]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from splitwise.cluster import ClusterSpec, LocalCluster  # noqa: E402
from splitwise.engine.config import EngineConfig  # noqa: E402
from splitwise.engine.engine import LLMEngine  # noqa: E402
from splitwise.engine.sampling_params import SamplingParams  # noqa: E402
from splitwise.engine.tiny_model import default_model_dir  # noqa: E402
from splitwise.testing.rolling import RestartRecord, StreamingLoad, rolling_restart  # noqa: E402

ENGINE_ARGS = ["--block-size", "4", "--max-num-batched-tokens", "32", "--num-kv-blocks", "512"]


def drain_totals(cluster: LocalCluster) -> dict[str, int]:
    """Sums of the "drain done" log lines of every restarted instance's first run."""
    totals = {"drains": 0, "handed_back": 0, "migrated": 0, "finished_in_place": 0, "grace_expired": 0}
    for log in cluster.log_dir.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if '"drain done"' in line:
                event = json.loads(line)
                totals["drains"] += 1
                for key in ("handed_back", "migrated", "finished_in_place"):
                    totals[key] += int(event[key])
                totals["grace_expired"] += int(bool(event["grace_expired"]))
    return totals


def router_redispatches(cluster: LocalCluster) -> float:
    url = cluster.entry.base_url.removesuffix("/v1") + "/metrics"
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith("splitwise_scheduler_frontend_events_total") and 'event="redispatched"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--grace", type=float, default=120.0, help="--drain-grace-period of every instance")
    parser.add_argument("--transfer", default="ipc", choices=["ipc", "tcp"])
    parser.add_argument("--prompts", type=int, default=6)
    args = parser.parse_args()

    model = default_model_dir("tiny")
    prompts = [[(7 * i + 31 * j) % 997 + 3 for j in range(24 + 4 * i)] for i in range(args.prompts)]
    engine = LLMEngine(
        EngineConfig(model=str(model), block_size=4, max_num_batched_tokens=32, num_kv_blocks=512)
    )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    reference = [r.text for r in engine.generate(prompts, params)]
    engine.close()

    spec = ClusterSpec(
        model=str(model),
        num_prefill=2,
        num_decode=2,
        router=True,
        transfer=args.transfer,
        threads_per_instance=1,
        extra_args=[*ENGINE_ARGS, "--drain-grace-period", str(args.grace)],
        scheduler_args=["--disagg-min-prefill-tokens", "0"],
    )
    cluster = LocalCluster(spec)
    try:
        cluster.start()
        cluster.wait_ready(timeout_s=600)
        load = StreamingLoad(
            cluster.entry.base_url, prompts, reference, max_tokens=args.max_tokens, num_clients=args.clients
        ).start()
        started = time.monotonic()

        def show(record: RestartRecord) -> None:
            print(
                f"restarted {record.name:<10} in {record.seconds:6.1f} s; {record.ok_during} requests ok meanwhile",
                flush=True,
            )

        try:
            records = rolling_restart(cluster, load, on_restart=show)
        finally:
            counts = load.stop()
        elapsed = time.monotonic() - started
        drains = drain_totals(cluster)
        redispatched = router_redispatches(cluster)
    finally:
        cluster.stop()
    print(f"instances restarted: {len(records)} in {elapsed:.1f} s under {args.clients} streaming clients")
    print(
        f"requests: {counts.total} total, {counts.ok} ok, {counts.failed} failed, {counts.mismatched} not the reference"
    )
    print(
        "drains: "
        + ", ".join(f"{k} {v}" for k, v in drains.items())
        + f"; router re-dispatches {redispatched:g}"
    )
    for error in counts.errors:
        print("  ", error)
    return 0 if counts.failed == counts.mismatched == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
