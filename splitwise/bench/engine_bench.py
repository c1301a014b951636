"""Engine throughput: prefill and decode tokens/s of LLMEngine vs Hugging Face transformers'
``generate()`` (and optionally an older engine extracted from git), on the same weights, measured
interleaved in one run next to the machine's measured roofline.

Prefill: B distinct prompts of ``prompt_len`` tokens, one output token each.
Decode: B prompts of ``context_len`` tokens, then ``decode_tokens`` forced outputs (eos ignored).
Only steps in which every sequence is already decoding are timed: for the engines each
``step()``, for transformers the interval between ``generate()``'s logits-processor calls (one per
generated token). decode tok/s = tokens produced in those steps / their time.
Each figure is the best of ``repeats`` runs after one warm-up, systems taking turns per repeat.
"""

from __future__ import annotations

import functools
import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from splitwise.bench.roofline import MachineLimits, ModelCost, best_limits, measure_limits
from splitwise.engine.config import EngineConfig, ModelConfig


@dataclass(frozen=True)
class EngineBenchRow:
    batch: int
    context_len: int
    system: str  # "splitwise" | "transformers" | "baseline@<commit>"
    prefill_tok_s: float
    decode_tok_s: float
    prefill_roofline_tok_s: float
    decode_roofline_tok_s: float


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


class System(ABC):
    """One thing being measured; built per (batch, context) cell, closed after it."""

    name: str

    @abstractmethod
    def prefill_s(self, prompts: list[list[int]]) -> float:
        """Seconds to prefill ``prompts`` and produce one token each."""

    @abstractmethod
    def decode_tok_s(self, prompts: list[list[int]], num_tokens: int) -> float:
        """Decode tokens/s over the steps in which every prompt is decoding."""

    def close(self) -> None:
        return None


class EngineSystem(System):
    """LLMEngine of this tree (``engine_module`` None) or of a baseline package."""

    _ids = itertools.count()

    def __init__(
        self,
        name: str,
        model_dir: Path,
        batch: int,
        max_len: int,
        device: str,
        dtype: str,
        module: ModuleType | None,
    ) -> None:
        if module is None:
            from splitwise.engine import engine as module_now
            from splitwise.engine import sampling_params

            module, params_module = module_now, sampling_params
        else:
            import importlib

            params_module = importlib.import_module(module.__name__.rsplit(".", 1)[0] + ".sampling_params")
        cost = ModelCost.of(ModelConfig.from_dir(model_dir), torch.float32)
        kv_bytes = int(batch * (max_len + 32) * cost.kv_bytes_per_token * 1.25) + (64 << 20)
        self.name = name
        self._params = params_module.SamplingParams
        self.engine = module.LLMEngine(
            module.EngineConfig(
                model=str(model_dir),
                device=device,
                dtype=dtype,
                max_num_seqs=batch,
                max_num_batched_tokens=max(2048, min(batch * max_len, 16384)),
                enable_prefix_caching=False,  # every repeat computes its prompts (transformers has no cache)
                detokenize=False,  # like generate(): token ids only (serving instances run this way too)
                kv_cache_memory_bytes=kv_bytes,
            )
        )

    def prefill_s(self, prompts: list[list[int]]) -> float:
        one = self._params(max_tokens=1, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        self.engine.generate(prompts, one)
        return time.perf_counter() - start

    def decode_tok_s(self, prompts: list[list[int]], num_tokens: int) -> float:
        params = self._params(max_tokens=num_tokens, temperature=0, ignore_eos=True)
        run = next(self._ids)
        for i, prompt in enumerate(prompts):
            self.engine.add_request(f"bench-{run}-{i}", prompt, params)
        started: set[str] = set()
        decode_s, decode_tokens = 0.0, 0
        while self.engine.has_unfinished():
            all_decoding = len(started) == len(prompts)
            start = time.perf_counter()
            outputs = self.engine.step()
            elapsed = time.perf_counter() - start
            for out in outputs:
                if out.new_token_ids:
                    started.add(out.req_id)
            if all_decoding:
                decode_s += elapsed
                decode_tokens += sum(len(out.new_token_ids) for out in outputs)
        return decode_tokens / max(decode_s, 1e-9)

    def close(self) -> None:
        self.engine.close()


class TransformersSystem(System):
    def __init__(self, model_dir: Path, device: str, dtype: str) -> None:
        from transformers import AutoModelForCausalLM

        self.name = "transformers"
        self.device = torch.device(device)
        model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
        self.model = model.to(self.device).eval()

    def _generate(self, prompts: list[list[int]], num_tokens: int, processors: list[Any]) -> None:
        from transformers import LogitsProcessorList

        ids = torch.tensor(prompts, device=self.device)
        with torch.inference_mode():
            self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=num_tokens,
                min_new_tokens=num_tokens,
                do_sample=False,
                pad_token_id=0,
                logits_processor=LogitsProcessorList(processors),
            )

    def prefill_s(self, prompts: list[list[int]]) -> float:
        start = time.perf_counter()
        self._generate(prompts, 1, [])
        return time.perf_counter() - start

    def decode_tok_s(self, prompts: list[list[int]], num_tokens: int) -> float:
        stamps: list[float] = []

        def stamp(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if scores.device.type == "cuda":
                torch.cuda.synchronize(scores.device)
            stamps.append(time.perf_counter())
            return scores

        self._generate(prompts, num_tokens, [stamp])
        return len(prompts) * (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)


def _prefill(system: System, prompts: list[list[int]]) -> float:
    return system.prefill_s(prompts)


def _decode(system: System, prompts: list[list[int]], num_tokens: int) -> float:
    return system.decode_tok_s(prompts, num_tokens)


def _interleaved_best(
    systems: list[System], measure: Callable[[System], float], repeats: int, lower: bool
) -> dict[str, float]:
    """One warm-up each, then ``repeats`` rounds in which every system runs once, in turn."""
    for system in systems:
        measure(system)
    best: dict[str, float] = {}
    for _ in range(repeats):
        for system in systems:
            value = measure(system)
            old = best.get(system.name)
            best[system.name] = value if old is None else (min(old, value) if lower else max(old, value))
    return best


@dataclass(frozen=True)
class BenchSpec:
    model_dir: Path
    batches: list[int]
    context_lens: list[int]
    prompt_len: int
    decode_tokens: int
    device: str = "cpu"
    dtype: str = "float32"
    repeats: int = 3
    baseline_commit: str | None = None
    with_transformers: bool = True
    reference_dtype: str | None = None  # transformers' dtype; None: the same as ``dtype``


def run_engine_bench(
    spec: BenchSpec, progress: Callable[[str], None] | None = None
) -> tuple[list[dict[str, float | int | str]], MachineLimits]:
    baseline = None
    if spec.baseline_commit is not None:
        from splitwise.bench.engine_baseline import import_baseline

        baseline = import_baseline(spec.baseline_commit)
    model_config = ModelConfig.from_dir(spec.model_dir)
    EngineConfig(model=str(spec.model_dir), device=spec.device, dtype=spec.dtype)  # validate flags early
    cost = ModelCost.of(model_config, getattr(torch, spec.dtype))
    vocab = model_config.vocab_size
    limits = [measure_limits(spec.device, getattr(torch, spec.dtype))]
    rows: list[dict[str, float | int | str]] = []
    for batch, context_len in itertools.product(spec.batches, spec.context_lens):
        max_len = max(spec.prompt_len, context_len) + spec.decode_tokens
        if progress is not None:
            progress(f"batch {batch}, context {context_len} ...")
        systems: list[System] = [
            EngineSystem("splitwise", spec.model_dir, batch, max_len, spec.device, spec.dtype, None)
        ]
        if baseline is not None:
            name = f"baseline@{spec.baseline_commit}"
            systems.append(
                EngineSystem(name, spec.model_dir, batch, max_len, spec.device, spec.dtype, baseline)
            )
        if spec.with_transformers:
            systems.append(
                TransformersSystem(spec.model_dir, spec.device, spec.reference_dtype or spec.dtype)
            )
        try:
            limits.append(measure_limits(spec.device, getattr(torch, spec.dtype)))
            prefill_prompts = _prompts(batch, spec.prompt_len, vocab, 1)
            prefill = _interleaved_best(
                systems, functools.partial(_prefill, prompts=prefill_prompts), spec.repeats, lower=True
            )
            limits.append(measure_limits(spec.device, getattr(torch, spec.dtype)))
            decode_prompts = _prompts(batch, context_len, vocab, 2)
            decode = _interleaved_best(
                systems,
                functools.partial(_decode, prompts=decode_prompts, num_tokens=spec.decode_tokens),
                spec.repeats,
                lower=False,
            )
            limits.append(measure_limits(spec.device, getattr(torch, spec.dtype)))
        finally:
            for system in systems:
                system.close()
        machine = best_limits(limits)
        for system in systems:
            rows.append(
                asdict(
                    EngineBenchRow(
                        batch=batch,
                        context_len=context_len,
                        system=system.name,
                        prefill_tok_s=batch * spec.prompt_len / prefill[system.name],
                        decode_tok_s=decode[system.name],
                        prefill_roofline_tok_s=cost.prefill_roofline_tok_s(machine, batch, spec.prompt_len),
                        decode_roofline_tok_s=cost.decode_roofline_tok_s(machine, batch, context_len),
                    )
                )
            )
        _add_ratios(rows[-len(systems) :])
    return rows, best_limits(limits)


def _add_ratios(cell: list[dict[str, float | int | str]]) -> None:
    """splitwise / each other system, per figure (x > 1: splitwise is faster)."""
    ours = cell[0]
    for other in cell[1:]:
        key = "transformers" if other["system"] == "transformers" else "baseline"
        for figure in ("prefill", "decode"):
            ours[f"x_{figure}_vs_{key}"] = float(ours[f"{figure}_tok_s"]) / float(other[f"{figure}_tok_s"])
