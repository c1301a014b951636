"""TTFT of a 1P1D cluster vs a mixed instance at idle, and how much layer pipelining hides.

    .venv/bin/python bench/pd_ttft.py [--lengths 128,1024,4096] [--repeats 3] [--transfers ipc,tcp]
                                      [--threads 1] [--model DIR]

Setups, each a real local cluster (redis-server + `splitwise serve` processes, the built-in `small`
model unless --model): a mixed instance; 1P1D per transfer protocol; and 1P1D per protocol with the
hidden ``--debug-unpipelined-transfer`` (P ships every layer only after the whole prefill, the
baseline layer pipelining is measured against). Requests go one at a time (idle cluster) to the
entry instance (D for 1P1D), as streaming completions with random prompts of exactly N tokens
(prefix caching off); TTFT = request sent -> first SSE content chunk, median of --repeats after
one warm-up request per setup. Every setup runs at the same time (idle between requests) and the
requests are interleaved: repeat r of length N goes to each setup in turn with the same prompt, so
a load change on the machine hits every setup alike. One HTTP client (keep-alive connections,
opened by the warm-up) is made before any timed request: connecting is not part of TTFT.

Columns: ``overhead`` = TTFT(1P1D) - TTFT(mixed): what disaggregation costs at idle (control
round trips, the part of the transfer that is not hidden, D's admission); ``hidden`` =
TTFT(unpipelined) - TTFT(pipelined): transfer time the layer pipeline overlaps with compute.
Every instance gets --threads torch threads, so P computes a prefill with what a mixed instance has.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass

import httpx

from splitwise.cluster import ClusterSpec, LocalCluster
from splitwise.engine.tiny_model import default_model_dir


@dataclass(frozen=True)
class Setup:
    name: str
    transfer: str | None  # None: one mixed instance
    pipelined: bool = True


def time_to_first_chunk(client: httpx.Client, base_url: str, prompt: list[int]) -> float:
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0.0, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    with client.stream("POST", f"{base_url}/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read().decode()}")
        elapsed = None
        for line in resp.iter_lines():  # read to the end: the next request starts on an idle cluster
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(f"request failed: {event['error']}")
            if elapsed is None and event.get("choices"):
                elapsed = time.perf_counter() - start
    if elapsed is None:
        raise RuntimeError("the stream ended without a content chunk")
    return elapsed


def cluster_spec(setup: Setup, args: argparse.Namespace) -> ClusterSpec:
    extra = ["--max-model-len", str(max(args.lengths) + 64), "--no-enable-prefix-caching"]
    if not setup.pipelined:
        extra.append("--debug-unpipelined-transfer")
    if setup.transfer is None:
        return ClusterSpec(
            model=args.model,
            num_prefill=0,
            num_decode=0,
            num_mixed=1,
            extra_args=extra,
            threads_per_instance=args.threads,
        )
    return ClusterSpec(
        model=args.model,
        num_prefill=1,
        num_decode=1,
        transfer=setup.transfer,
        extra_args=extra,
        threads_per_instance=args.threads,
    )


def check_transfers(setup: Setup, cluster: LocalCluster, expected: int) -> None:
    """Every request of a 1P1D setup must have gone through a KV transfer (none prefilled on D)."""
    log = next(c for c in cluster.children if c.role == "decode").log_file.read_text()
    num_landed = log.count("remote prefill landed")
    if num_landed != expected or "prefilling locally" in log:
        raise RuntimeError(f"{setup.name}: {num_landed}/{expected} requests went through a KV transfer")


def run_interleaved(
    setups: list[Setup], args: argparse.Namespace, rng: random.Random
) -> dict[str, dict[int, float]]:
    clusters = {setup.name: LocalCluster(cluster_spec(setup, args)) for setup in setups}
    try:
        for cluster in clusters.values():
            cluster.start()
        for cluster in clusters.values():
            cluster.wait_ready(timeout_s=300)
        with httpx.Client(timeout=600) as client:
            warm_up = [rng.randrange(3, args.vocab) for _ in range(min(args.lengths))]
            for cluster in clusters.values():
                time_to_first_chunk(client, cluster.entry.base_url, warm_up)
            samples: dict[str, dict[int, list[float]]] = {
                s.name: {n: [] for n in args.lengths} for s in setups
            }
            for _ in range(args.repeats):
                for length in args.lengths:
                    prompt = [rng.randrange(3, args.vocab) for _ in range(length)]
                    for setup in setups:
                        url = clusters[setup.name].entry.base_url
                        samples[setup.name][length].append(time_to_first_chunk(client, url, prompt))
        for setup in setups:
            for length in args.lengths:
                shown = " ".join(f"{s * 1000:.0f}" for s in samples[setup.name][length])
                print(f"  {setup.name:<26} {length:>5} tokens: {shown} ms", file=sys.stderr, flush=True)
            if setup.transfer is not None:
                check_transfers(setup, clusters[setup.name], 1 + len(args.lengths) * args.repeats)
        return {
            name: {n: statistics.median(values) for n, values in per_length.items()}
            for name, per_length in samples.items()
        }
    finally:
        for cluster in clusters.values():
            cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="128,1024,4096", help="Prompt lengths in tokens.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transfers", default="ipc,tcp")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per instance.")
    parser.add_argument("--model", default=None, help="Model directory (default: the built-in small model).")
    args = parser.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.model = args.model or str(default_model_dir("small"))
    from splitwise.engine.config import ModelConfig

    args.vocab = ModelConfig.from_dir(args.model).vocab_size
    rng = random.Random(0)
    setups = [Setup("mixed", None)]
    for transfer in args.transfers.split(","):
        setups += [
            Setup(f"1P1D-{transfer}", transfer),
            Setup(f"1P1D-{transfer}-unpipelined", transfer, False),
        ]
    print(f"setups {', '.join(s.name for s in setups)}: starting all, then interleaving ...", file=sys.stderr)
    results = run_interleaved(setups, args, rng)

    mixed = results["mixed"]
    print(
        f"\nTTFT at idle, median of {args.repeats} (ms); model {args.model}, {args.threads} torch thread(s) per instance"
    )
    header = f"{'setup':<24}" + "".join(f"{n:>9}" for n in args.lengths)
    print(header)
    print("-" * len(header))
    for name, medians in results.items():
        print(f"{name:<24}" + "".join(f"{medians[n] * 1000:>9.0f}" for n in args.lengths))
    print(
        "\noverhead of disaggregation = 1P1D - mixed (ms); hidden by layer pipelining = unpipelined - pipelined (ms)"
    )
    for transfer in args.transfers.split(","):
        piped, unpiped = results[f"1P1D-{transfer}"], results[f"1P1D-{transfer}-unpipelined"]
        print(
            f"{transfer + ' overhead':<24}"
            + "".join(f"{(piped[n] - mixed[n]) * 1000:>+9.0f}" for n in args.lengths)
        )
        print(
            f"{transfer + ' hidden':<24}"
            + "".join(f"{(unpiped[n] - piped[n]) * 1000:>+9.0f}" for n in args.lengths)
        )


if __name__ == "__main__":
    main()
