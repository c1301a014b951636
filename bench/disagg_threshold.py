"""Where prefilling on the decode node beats handing the prompt to a prefill node (the default of
``--disagg-min-prefill-tokens``).

    .venv/bin/python bench/disagg_threshold.py [--lengths 4,8,16,32,64,128] [--repeats 5] [--model DIR]

One 1P1D cluster (tcp, the built-in `small` model unless --model, prefix caching off) and two
routers on it: one always hands off (``--disagg-min-prefill-tokens 0``), one never does (a limit
above every prompt). Requests go one at a time, interleaved between the routers with the same
random prompt, as streaming completions; TTFT = sent -> first content chunk, median of --repeats.

Columns: ``handoff`` and ``local`` TTFT; ``overhead`` = handoff - local, what a hand-off costs at
idle; ``prefill`` = local(N) - local(shortest), the decode node's time computing the N tokens,
which is also how long a local prefill stalls the decodes running on D. The rule for the default:
the largest N whose local prefill is no longer than the hand-off's overhead (below it, a hand-off
costs the request more than a local prefill costs the other requests on D).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import httpx

from splitwise.cluster import ClusterSpec, LocalCluster
from splitwise.engine.tiny_model import default_model_dir


def ttft_ms(client: httpx.Client, base_url: str, prompt: list[int]) -> float:
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0.0, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    with client.stream("POST", f"{base_url}/completions", json=body, timeout=300) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data:") and '"text"' in line:
                return (time.perf_counter() - start) * 1000
    raise RuntimeError("no content chunk")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="4,8,16,32,64,128")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    model = args.model or str(default_model_dir("small"))
    spec = ClusterSpec(
        model=model, transfer="tcp", threads_per_instance=1, extra_args=["--no-enable-prefix-caching"]
    )
    cluster = LocalCluster(spec)
    try:
        cluster.start()
        handoff = cluster.spawn_router("router-handoff", extra=["--disagg-min-prefill-tokens", "0"])
        local = cluster.spawn_router("router-local", extra=["--disagg-min-prefill-tokens", "1000000"])
        cluster.children += [handoff, local]
        cluster.wait_ready(timeout_s=600)
        rng = random.Random(0)
        results: dict[tuple[str, int], list[float]] = {}
        with httpx.Client() as client:
            for router in (handoff, local):
                ttft_ms(client, router.base_url, [5] * 8)  # warm-up: connections, the P<->D channel
            for _ in range(args.repeats):
                for n in lengths:
                    prompt = [rng.randint(3, 1000) for _ in range(n)]
                    for name, router in (("handoff", handoff), ("local", local)):
                        results.setdefault((name, n), []).append(ttft_ms(client, router.base_url, prompt))
        med = {key: statistics.median(v) for key, v in results.items()}
        print(f"TTFT at idle, median of {args.repeats} (ms); model {model}, 1 torch thread per instance")
        print(f"{'tokens':>7} {'handoff':>8} {'local':>8} {'overhead':>9} {'prefill':>8}")
        base = med[("local", lengths[0])]
        for n in lengths:
            h, loc = med[("handoff", n)], med[("local", n)]
            print(f"{n:>7} {h:8.1f} {loc:8.1f} {h - loc:+9.1f} {loc - base:8.1f}")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
