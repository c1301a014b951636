"""Per-step sampler cost at batch 32: every penalty on (presence, frequency, repetition, plus
logit_bias, min_p and min_tokens) against plain greedy, as a ratio measured in the same run.

Each step samples one token for 32 rows over the model's vocabulary, with histories of
``--prompt-tokens`` prompt and ``--output-tokens`` output tokens per row (what penalties scan).
The two configurations alternate step by step so both see the same machine load; the ratio of
each adjacent pair is the figure least disturbed by a shared machine.

    .venv/bin/python bench/sampling_cost.py [--vocab 32000] [--steps 200] [--device cpu]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from splitwise.engine.logits_processing import TokenHistory
from splitwise.engine.sampler import Sampler
from splitwise.engine.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: no pool contention)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rng = random.Random(0)
    # As the engine keeps them: one TokenHistory per request, synced with its output each step.
    outputs = [[rng.randrange(args.vocab) for _ in range(args.output_tokens)] for _ in range(args.batch)]
    token_histories = [
        TokenHistory([rng.randrange(args.vocab) for _ in range(args.prompt_tokens)])
        for _ in range(args.batch)
    ]
    greedy = [SamplingParams(temperature=0.0)] * args.batch
    penalised = [
        SamplingParams(
            temperature=0.0,
            presence_penalty=0.5,
            frequency_penalty=0.5,
            repetition_penalty=1.2,
            logit_bias=((1, 5.0), (2, -5.0)),
            min_tokens=args.output_tokens + 1,
            max_tokens=args.output_tokens + 2,
            min_p=0.05,
        )
    ] * args.batch
    sampler = Sampler(stop_token_ids=frozenset({0}))
    indices = [args.output_tokens] * args.batch
    generator = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(args.batch, args.vocab, generator=generator, device=device)

    def step(params: list[SamplingParams]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        histories = (
            [h.sync(out) for h, out in zip(token_histories, outputs, strict=True)]
            if params is penalised
            else None
        )
        sampler.sample(logits, params, indices, histories=histories)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(10):  # warm-up
        step(greedy)
        step(penalised)
    plain_s, penalty_s = [], []
    for _ in range(args.steps):
        plain_s.append(step(greedy))
        penalty_s.append(step(penalised))
    plain, penalty = statistics.median(plain_s), statistics.median(penalty_s)
    print(
        f"batch {args.batch}, vocab {args.vocab}, history {args.prompt_tokens}+{args.output_tokens} tokens, "
        f"{args.steps} steps on {device} ({torch.get_num_threads()} threads)"
    )
    print(f"greedy        median {plain * 1e3:8.3f} ms/step")
    print(f"all penalties median {penalty * 1e3:8.3f} ms/step")
    pair_ratios = sorted(b / a for a, b in zip(plain_s, penalty_s, strict=True))
    print(
        f"ratio of medians {penalty / plain:.2f}x; median of per-step ratios {statistics.median(pair_ratios):.2f}x"
    )


if __name__ == "__main__":
    main()
