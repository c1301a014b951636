"""TTFT of a 1P1D cluster vs a mixed instance at idle, and how much layer pipelining hides.

    .venv/bin/python bench/pd_ttft.py [--lengths 128,1024,4096] [--repeats 3] [--transfers ipc,tcp]
                                      [--threads 1] [--model DIR]

Setups, each a real local cluster (redis-server + `splitwise serve` processes, the built-in `small`
model unless --model): a mixed instance; 1P1D per transfer protocol; and 1P1D per protocol with the
hidden ``--debug-unpipelined-transfer`` (P ships every layer only after the whole prefill, the
baseline layer pipelining is measured against). Requests go one at a time (idle cluster) to the
entry instance (D for 1P1D), as streaming completions with fresh random prompts of exactly N
tokens (prefix caching off); TTFT = request sent -> first SSE content chunk, median of --repeats
after one warm-up request per setup.

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


def time_to_first_chunk(base_url: str, prompt: list[int]) -> float:
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0.0, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    with httpx.stream("POST", f"{base_url}/completions", json=body, timeout=600) as resp:
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


def run_setup(setup: Setup, args: argparse.Namespace, rng: random.Random) -> dict[int, float]:
    extra = ["--max-model-len", str(max(args.lengths) + 64), "--no-enable-prefix-caching"]
    if not setup.pipelined:
        extra.append("--debug-unpipelined-transfer")
    if setup.transfer is None:
        spec = ClusterSpec(
            model=args.model,
            num_prefill=0,
            num_decode=0,
            num_mixed=1,
            extra_args=extra,
            threads_per_instance=args.threads,
        )
    else:
        spec = ClusterSpec(
            model=args.model,
            num_prefill=1,
            num_decode=1,
            transfer=setup.transfer,
            extra_args=extra,
            threads_per_instance=args.threads,
        )
    cluster = LocalCluster(spec)
    try:
        cluster.start()
        cluster.wait_ready(timeout_s=300)
        url = cluster.entry.base_url
        vocab = args.vocab
        time_to_first_chunk(url, [rng.randrange(3, vocab) for _ in range(min(args.lengths))])  # warm-up
        medians = {}
        for length in args.lengths:
            samples = [
                time_to_first_chunk(url, [rng.randrange(3, vocab) for _ in range(length)])
                for _ in range(args.repeats)
            ]
            medians[length] = statistics.median(samples)
            print(
                f"  {setup.name:<22} {length:>5} tokens: "
                + " ".join(f"{s * 1000:.0f}" for s in samples)
                + " ms",
                file=sys.stderr,
                flush=True,
            )
        if setup.transfer is not None:
            log = next(c for c in cluster.children if c.role == "decode").log_file.read_text()
            num_landed = log.count("remote prefill landed")
            expected = 1 + len(args.lengths) * args.repeats
            if num_landed != expected or "prefilling locally" in log:
                raise RuntimeError(
                    f"{setup.name}: {num_landed}/{expected} requests went through a KV transfer"
                )
        return medians
    finally:
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
    results = {}
    for setup in setups:
        print(f"setup {setup.name} ...", file=sys.stderr, flush=True)
        results[setup.name] = run_setup(setup, args, rng)

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
