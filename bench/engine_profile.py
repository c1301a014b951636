"""Where one decode step of the engine's model runner spends its time (torch.profiler, CPU).

    .venv/bin/python bench/engine_profile.py [--batch 8] [--context-len 512] [--steps 5]
                                             [--threads 1] [--dtype float32] [--model DIR]

B sequences of ``context_len`` tokens already in the cache (scattered block ids), each decoding
one token per step; prints step time (best and median of 15) and the top ops by self CPU time
over ``--steps`` profiled steps, with each op's share of the step and the aten op count per step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from splitwise.engine.config import EngineConfig, ModelConfig
from splitwise.engine.model_runner import ModelRunner, ScheduledChunk, build_kv_cache
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import Sequence
from splitwise.engine.tiny_model import default_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", default=None, help="default: the built-in small model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or str(default_model_dir("small"))
    model_config = ModelConfig.from_dir(model_dir)
    block_size = 16
    blocks_per_seq = args.context_len // block_size + 2
    engine_config = EngineConfig(
        model=model_dir, dtype=args.dtype, block_size=block_size, num_kv_blocks=args.batch * blocks_per_seq
    )
    runner = ModelRunner(model_config, engine_config, build_kv_cache(model_config, engine_config))
    order = torch.randperm(args.batch * blocks_per_seq, generator=torch.Generator().manual_seed(0)).tolist()
    chunks = []
    for b in range(args.batch):
        seq = Sequence(
            req_id=str(b),
            prompt_token_ids=[3 + (i % (model_config.vocab_size - 3)) for i in range(args.context_len + 1)],
            params=SamplingParams(),
            block_table=order[b * blocks_per_seq : (b + 1) * blocks_per_seq],
            num_computed_tokens=args.context_len,
        )
        chunks.append(ScheduledChunk(seq, 1))
    for _ in range(3):
        runner.execute(chunks)
    times = []
    for _ in range(15):
        start = time.perf_counter()
        runner.execute(chunks)
        times.append(time.perf_counter() - start)
    print(
        f"batch {args.batch}, context {args.context_len}, {args.dtype}, {args.threads} thread(s): step "
        f"best {min(times) * 1e3:.2f} ms, median {statistics.median(times) * 1e3:.2f} ms, "
        f"{args.batch / min(times):.0f} tok/s"
    )
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            runner.execute(chunks)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    num_ops = sum(e.count for e in events if e.key.startswith("aten::")) / args.steps
    print(
        f"profiled {args.steps} steps: {total / args.steps / 1e3:.2f} ms CPU per step, {num_ops:.0f} aten ops per step"
    )
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        share = 100 * event.self_cpu_time_total / total
        print(f"  {event.key:<50} {share:5.1f} %  {event.count / args.steps:6.0f} calls/step")


if __name__ == "__main__":
    main()
