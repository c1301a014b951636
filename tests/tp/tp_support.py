"""Helpers of the tensor-parallel tests: tiny engines and process checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

from splitwise.engine.config import EngineConfig
from splitwise.engine.engine import LLMEngine
from splitwise.engine.outputs import GenerationResult
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.tiny_model import default_model_dir

# A prompt longer than the step budget (chunked prefill), and one sharing its first 16 tokens
# (4 full blocks: a prefix-cache hit when it runs after the first).
LONG = list(range(5, 41))
SHARED = LONG[:16] + [900, 901, 902, 7, 8]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=1)


def engine(size: str, arch: str, tp: int) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=str(default_model_dir(size, arch)),
            tensor_parallel_size=tp,
            num_kv_blocks=64,
            block_size=4,
            max_num_batched_tokens=8,
        )
    )


def run(eng: LLMEngine) -> list[GenerationResult]:
    """The two prompts one after the other, so the second may reuse the first's cached prefix."""
    return eng.generate([LONG], GREEDY) + eng.generate([SHARED], GREEDY)


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split(")")[-1].split()[0] != "Z"  # a zombie is gone, just unreaped
    except OSError:
        return False


def rank_pids(log_text: str) -> list[int]:
    """Pids of the rank processes 1..N-1 an instance started (its "tensor-parallel rank started" lines)."""
    return [
        int(json.loads(line)["pid"])
        for line in log_text.splitlines()
        if '"tensor-parallel rank started"' in line
    ]
