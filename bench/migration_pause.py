"""The pause a live migration puts in a client's stream, against the plain inter-token latency.

    .venv/bin/python bench/migration_pause.py [--transfer ipc] [--repeats 10] [--tokens 600]
                                              [--migrate-after 100] [--threads 1] [--model DIR]

A real 1P2D cluster (redis-server + `splitwise serve` processes, the built-in tiny model unless
--model). Each repeat streams one greedy completion of --tokens tokens and, once --migrate-after
content chunks arrived, asks for its migration (`splitwise migrate`'s path: a MigrateCommand on the
decode nodes' control streams; the node running it picks the other). Every SSE content chunk's
arrival time is recorded on the client. In the same run, per repeat:

    switch gap = the largest gap between two consecutive chunks after the migration was asked for
                 (the gap across D1's last token and D2's first)
    ITL        = every other gap of the same stream (before the ask, and after the switch)

Printed: p50 / p99 of the switch gaps and of the ITLs (same streams, so a machine-load change hits
both), their ratio, and the source's own measure (``pause_ms`` in its "migration ended" log line:
paused in D1's engine until D2 acknowledged the commit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import time
from pathlib import Path

import httpx

from scheduler.config import SchedulerConfig
from splitwise.cluster import ClusterSpec, LocalCluster
from splitwise.commands.migrate import send
from splitwise.engine.tiny_model import default_model_dir

ENGINE = ["--block-size", "16", "--num-kv-blocks", "1024", "--disagg-min-prefill-tokens", "0"]


def stream(base_url: str, prompt: list[int], request_id: str, tokens: int, on_chunk: object) -> list[float]:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0.0, "ignore_eos": True, "stream": True}
    arrivals: list[float] = []
    headers = {"X-Request-Id": request_id}
    with httpx.stream("POST", f"{base_url}/completions", json=body, headers=headers, timeout=600) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read().decode()}")
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(f"request failed: {event['error']}")
            if any(c.get("text") for c in event.get("choices", [])):
                arrivals.append(time.perf_counter())
                on_chunk(len(arrivals))  # type: ignore[operator]
    return arrivals


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--transfer", default="ipc")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=600)
    ap.add_argument("--migrate-after", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    model = args.model or str(default_model_dir())
    spec = ClusterSpec(
        model=model,
        num_prefill=1,
        num_decode=2,
        transfer=args.transfer,
        extra_args=ENGINE,
        threads_per_instance=args.threads,
    )
    cluster = LocalCluster(spec)
    cluster.start()
    try:
        cluster.wait_ready(timeout_s=300)
        host, port = cluster.scheduler_address
        config = SchedulerConfig(scheduler_host=host, scheduler_port=port, scheduler_topic=spec.topic)
        switch_gaps: list[float] = []
        itls: list[float] = []
        for r in range(args.repeats):
            prompt = [3 + (7 * i + r) % 900 for i in range(64)]
            request_id = f"bench-{r}"
            asked: list[int] = []

            def on_chunk(n: int, request_id: str = request_id, asked: list[int] = asked) -> None:
                if n == args.migrate_after and not asked:
                    asyncio.run(send(config, f"cmpl-{request_id}", to=None, source=None))
                    asked.append(n)

            arrivals = stream(cluster.entry.base_url, prompt, request_id, args.tokens, on_chunk)
            gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
            after = list(range(args.migrate_after, len(gaps)))
            switch = max(after, key=lambda i: gaps[i])
            switch_gaps.append(gaps[switch])
            itls.extend(g for i, g in enumerate(gaps) if i != switch)
        pauses = [
            float(m)
            for child in cluster.children
            if child.role == "decode"
            for m in re.findall(
                r'"pause_ms": ([0-9.]+)[^\n]*"event": "migration ended"', Path(child.log_file).read_text()
            )
        ]
        ms = 1000.0
        print(f"transfer={args.transfer} repeats={args.repeats} tokens={args.tokens} migrated={len(pauses)}")
        print(
            f"switch gap   p50 {pct(switch_gaps, 0.5) * ms:8.2f} ms   p99 {pct(switch_gaps, 0.99) * ms:8.2f} ms"
        )
        print(f"plain ITL    p50 {pct(itls, 0.5) * ms:8.2f} ms   p99 {pct(itls, 0.99) * ms:8.2f} ms")
        print(f"ratio (switch p50 / ITL p50) {pct(switch_gaps, 0.5) / pct(itls, 0.5):.1f}x")
        if pauses:
            print(f"source pause p50 {statistics.median(pauses):8.2f} ms   max {max(pauses):8.2f} ms")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
