"""Soak: a real 1P1D cluster under steady load for a bounded time, resources at start and end.

Starts redis-server, one prefill and one decode instance (`splitwise.cluster.LocalCluster`, the
built-in small model unless --model), warms up, then keeps --concurrency clients sending a mix of
streaming and non-streaming completions (random prompt and output lengths) for --duration
seconds. Before and after the load window it records, per instance: RSS, open fds, threads; for
Redis: keys (DBSIZE) and used memory; the /dev/shm segments of the cluster's instances; and after
the cluster stopped, leftover temp dirs. Prints both snapshots and their growth ratios
(end / start). The done-when of issue #13: RSS growth < 5 %, fds and threads flat, no leftover
shm segments or temp dirs.

    .venv/bin/python bench/soak.py [--duration 600] [--warmup 30] [--concurrency 4] [--transfer ipc]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scheduler.keys import KeySchema  # noqa: E402
from splitwise.cluster import Child, ClusterSpec, LocalCluster  # noqa: E402
from splitwise.engine.tiny_model import default_model_dir  # noqa: E402

ENGINE_ARGS = ["--block-size", "4", "--max-num-batched-tokens", "64", "--num-kv-blocks", "1024"]


@dataclass
class Snapshot:
    at_s: float
    instances: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> rss_kib, fds, threads
    redis_keys: int = 0
    redis_memory_bytes: int = 0
    redis_log_entries: int = 0  # the request log: capped (log_maxlen, 100k entries), grows until then
    shm_segments: int = 0


def _proc_status(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def _shm_segments(pids: list[int]) -> int:
    """Segments named splitwise-kv-<owner pid>-<hex>, owned by the cluster's instances."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return 0
    owned = {f"splitwise-kv-{pid}-" for pid in pids}
    return sum(1 for n in names if any(n.startswith(prefix) for prefix in owned))


def snapshot(cluster: LocalCluster, started: float) -> Snapshot:
    snap = Snapshot(at_s=time.monotonic() - started)
    for child in cluster.children:
        pid = child.process.pid
        snap.instances[child.name] = {
            "rss_kib": _proc_status(pid, "VmRSS"),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": _proc_status(pid, "Threads"),
        }
    host, port = cluster.scheduler_address
    client = redis.Redis(host=host, port=port)
    try:
        snap.redis_keys = int(client.dbsize())  # type: ignore[arg-type]
        snap.redis_memory_bytes = int(client.info("memory")["used_memory"])  # type: ignore[index]
        snap.redis_log_entries = int(client.xlen(KeySchema(cluster.spec.topic).log))  # type: ignore[arg-type]
    finally:
        client.close()
    snap.shm_segments = _shm_segments([c.process.pid for c in cluster.children])
    return snap


@dataclass
class Load:
    ok: int = 0
    errors: int = 0
    tokens: int = 0
    error_samples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, ok: bool, tokens: int = 0, error: str = "") -> None:
        with self.lock:
            if ok:
                self.ok += 1
                self.tokens += tokens
            else:
                self.errors += 1
                if len(self.error_samples) < 5:
                    self.error_samples.append(error[:200])


def client_loop(entries: list[Child], load: Load, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=120) as http:
        while not stop.is_set():
            child = rng.choice(entries)
            body = {
                "prompt": [rng.randint(3, 1000) for _ in range(rng.randint(4, 200))],
                "max_tokens": rng.randint(4, 64),
                "temperature": 0.0,
                "ignore_eos": True,
            }
            try:
                if rng.random() < 0.5:
                    resp = http.post(f"{child.base_url}/completions", json=body)
                    ok = resp.status_code == 200
                    tokens = resp.json()["usage"]["completion_tokens"] if ok else 0
                    load.record(ok, tokens, "" if ok else resp.text)
                else:
                    body["stream"] = True
                    chunks = 0
                    with http.stream("POST", f"{child.base_url}/completions", json=body) as resp:
                        if resp.status_code != 200:
                            load.record(False, error=resp.read().decode())
                            continue
                        for line in resp.iter_lines():
                            if line.startswith("data:") and "[DONE]" not in line:
                                chunks += 1
                    load.record(True, chunks)
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                load.record(False, error=repr(exc))


def _own_temp_dirs(cluster: LocalCluster) -> list[Path]:
    """The temp dirs this cluster made (its logs, redis-server's working dir); other processes on
    the machine make their own, which are not ours to count."""
    dirs = [cluster.log_dir]
    if cluster.redis is not None:
        dirs.append(cluster.redis.workdir)
    return dirs


def _ratio(end: float, start: float) -> str:
    return f"{end / start:.3f}" if start else ("1.000" if end == start else "inf")


def report(
    start: Snapshot, end: Snapshot, load: Load, window_s: float, leftover_dirs: set[str], shm_after: int
) -> None:
    print(f"\nload window {window_s:.0f} s: {load.ok} ok, {load.errors} errors, {load.tokens} tokens")
    for sample in load.error_samples:
        print(f"  error: {sample}")
    print(f"\n{'':<12} {'metric':<10} {'start':>10} {'end':>10} {'growth':>8}")
    rows: list[tuple[str, str, float, float]] = []
    for name, first in start.instances.items():
        last = end.instances[name]
        for metric in ("rss_kib", "fds", "threads"):
            rows.append((name, metric, first[metric], last[metric]))
    rows.append(("redis", "keys", start.redis_keys, end.redis_keys))
    rows.append(("redis", "memory_b", start.redis_memory_bytes, end.redis_memory_bytes))
    rows.append(("redis", "log_entr", start.redis_log_entries, end.redis_log_entries))
    rows.append(("/dev/shm", "segments", start.shm_segments, end.shm_segments))
    for who, metric, first_value, last_value in rows:
        print(
            f"{who:<12} {metric:<10} {first_value:>10.0f} {last_value:>10.0f} {_ratio(last_value, first_value):>8}"
        )
    print(
        f"\nafter stop: /dev/shm segments of the cluster {shm_after}, leftover temp dirs {sorted(leftover_dirs)}"
    )
    print(
        json.dumps(
            {
                "ok": load.ok,
                "errors": load.errors,
                "growth": {f"{w}.{m}": _ratio(b, a) for w, m, a, b in rows},
                "leftover_temp_dirs": len(leftover_dirs),
                "shm_after_stop": shm_after,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 10 min)")
    parser.add_argument(
        "--warmup", type=float, default=30.0, help="seconds of load before the start snapshot"
    )
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--transfer", choices=["ipc", "tcp"], default="ipc")
    parser.add_argument("--model", default=None, help="model dir (default: the built-in small model)")
    args = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if args.duration <= 0 or args.warmup < 0 or args.concurrency < 1:
        parser.error("--duration must be > 0, --warmup >= 0, --concurrency >= 1")

    model = args.model or str(default_model_dir())
    cluster = LocalCluster(
        ClusterSpec(model=model, num_prefill=1, num_decode=1, transfer=args.transfer, extra_args=ENGINE_ARGS)
    )
    pids: list[int] = []
    own_dirs: list[Path] = []
    try:
        cluster.start()
        cluster.wait_ready(timeout_s=300)
        pids = [c.process.pid for c in cluster.children]
        own_dirs = _own_temp_dirs(cluster)
        started = time.monotonic()
        load, stop = Load(), threading.Event()
        clients = [
            threading.Thread(target=client_loop, args=(cluster.children, load, stop, i), daemon=True)
            for i in range(args.concurrency)
        ]
        for t in clients:
            t.start()
        time.sleep(args.warmup)
        first = snapshot(cluster, started)
        window_start = time.monotonic()
        time.sleep(args.duration)
        stop.set()
        for t in clients:
            t.join(180)
        window_s = time.monotonic() - window_start
        time.sleep(3.0)  # in-flight requests end, leases and streams settle
        last = snapshot(cluster, started)
    finally:
        cluster.stop()
    shm_after = _shm_segments(pids)
    report(first, last, load, window_s, {str(d) for d in own_dirs if d.exists()}, shm_after)


if __name__ == "__main__":
    main()
