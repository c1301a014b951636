"""Engine throughput: prefill and decode tokens/s of LLMEngine vs Hugging Face transformers'
``generate()`` on the same weights, measured in the same run.

Prefill: B distinct prompts of ``prompt_len`` tokens, one output token each (both engines).
Each figure is the best of 3 timed runs after a warm-up run of the same shapes.
Decode: B prompts of ``decode_prompt_len`` tokens, ``decode_tokens`` forced outputs (eos ignored);
decode tok/s = B * (decode_tokens - 1) / (total time - prefill time of that batch).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from splitwise.engine.config import EngineConfig
from splitwise.engine.engine import LLMEngine
from splitwise.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineBenchRow:
    batch: int
    system: str  # "splitwise" | "transformers"
    prefill_tok_s: float
    decode_tok_s: float


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


def _time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best of ``repeats`` after one warm-up run of the same shapes (first runs pay kernel set-up)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_splitwise(
    model_dir: Path, batch: int, prompt_len: int, decode_prompt_len: int, decode_tokens: int
) -> EngineBenchRow:
    engine = LLMEngine(
        EngineConfig(
            model=str(model_dir),
            max_num_seqs=max(batch, 1),
            max_num_batched_tokens=max(batch * prompt_len, 2048),
            enable_prefix_caching=False,
            detokenize=False,  # like generate(): token ids only (serving instances run this way too)
            kv_cache_memory_bytes=512 * 1024 * 1024,
        )
    )
    vocab = engine.model_config.vocab_size
    try:
        one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        t_prefill = _time(lambda: engine.generate(_prompts(batch, prompt_len, vocab, 1), one))
        short = _prompts(batch, decode_prompt_len, vocab, 2)
        t_short_prefill = _time(lambda: engine.generate(short, one))
        many = SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True)
        t_total = _time(lambda: engine.generate(_prompts(batch, decode_prompt_len, vocab, 3), many))
    finally:
        engine.close()
    decode_s = max(t_total - t_short_prefill, 1e-9)
    return EngineBenchRow(
        batch, "splitwise", batch * prompt_len / t_prefill, batch * (decode_tokens - 1) / decode_s
    )


def bench_transformers(
    model_dir: Path, batch: int, prompt_len: int, decode_prompt_len: int, decode_tokens: int
) -> EngineBenchRow:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()  # type: ignore[no-untyped-call]
    vocab = model.config.vocab_size

    def run(prompts: list[list[int]], n: int) -> None:
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )

    t_prefill = _time(lambda: run(_prompts(batch, prompt_len, vocab, 1), 1))
    t_short_prefill = _time(lambda: run(_prompts(batch, decode_prompt_len, vocab, 2), 1))
    t_total = _time(lambda: run(_prompts(batch, decode_prompt_len, vocab, 3), decode_tokens))
    decode_s = max(t_total - t_short_prefill, 1e-9)
    return EngineBenchRow(
        batch, "transformers", batch * prompt_len / t_prefill, batch * (decode_tokens - 1) / decode_s
    )


def run_engine_bench(
    model_dir: Path, batches: list[int], prompt_len: int, decode_prompt_len: int, decode_tokens: int
) -> list[dict[str, float | int | str]]:
    rows: list[dict[str, float | int | str]] = []
    for batch in batches:
        ours = bench_splitwise(model_dir, batch, prompt_len, decode_prompt_len, decode_tokens)
        ref = bench_transformers(model_dir, batch, prompt_len, decode_prompt_len, decode_tokens)
        rows.append(
            asdict(ours)
            | {
                "ratio_prefill": ours.prefill_tok_s / ref.prefill_tok_s,
                "ratio_decode": ours.decode_tok_s / ref.decode_tok_s,
            }
        )
        rows.append(asdict(ref))
    return rows
