"""Batched token sampling: logits processing (penalties, logit_bias, min_tokens, structured-output
masks: splitwise/engine/logits_processing.py), then greedy or temperature / min_p / top-k / top-p,
with per-request seeds.

Every row reports the chosen token's logprob under the model's raw distribution
(``log_softmax`` of the unmodified logits), whatever the sampling settings, and, when its request
asks for ``top_logprobs: k``, the k most likely tokens under that same distribution (as vLLM).

Seeded rows draw their noise from a generator seeded by ``(seed, output index)``: the same seed
gives the same tokens whatever else is in the batch, and a preempted request that recomputes
draws the same tokens again. Unseeded rows share one generator seeded from the engine seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field

import torch

from splitwise.engine.logits_processing import RowHistory, process_logits
from splitwise.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]  # of the chosen token under log_softmax(raw logits)
    # Per row: the row's top_logprobs most likely (token id, logprob), most likely first ([] if 0).
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


def derive_seed(seed: int, output_index: int) -> int:
    """A 63-bit seed for the ``output_index``-th token of a request seeded with ``seed``."""
    digest = hashlib.sha256(f"{seed}:{output_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Sampler:
    def __init__(self, *, seed: int = 0, stop_token_ids: frozenset[int] = frozenset()) -> None:
        self.seed = seed
        self.stop_token_ids = stop_token_ids  # the model's eos ids: masked while min_tokens is not reached
        # The shared generator for unseeded rows, made on the device of the first logits seen.
        self._generator: torch.Generator | None = None

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def sample(
        self,
        logits: torch.Tensor,
        params: SequenceOf[SamplingParams],
        output_indices: SequenceOf[int],
        *,
        histories: SequenceOf[RowHistory] | None = None,
        allowed: torch.Tensor | None = None,
    ) -> SamplerOutput:
        """Pick one token per row of ``logits`` [batch, vocab].

        ``output_indices[i]`` is how many output tokens row ``i``'s request already has (its
        ``num_output_tokens``); it makes seeded sampling reproducible step by step. ``histories``
        (needed when any row uses penalties or min_tokens) are the rows' prompt and output tokens;
        ``allowed`` is the structured-output mask, bool [batch, vocab] (True = allowed).
        """
        if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(output_indices):
            raise ValueError(
                f"logits {tuple(logits.shape)} do not match {len(params)} params / {len(output_indices)} indices"
            )
        raw = logits.float()
        raw_logprobs = torch.log_softmax(raw, dim=-1)
        logits = raw
        if allowed is not None or any(p.needs_processing for p in params):
            if histories is None:
                if any(p.has_penalties or p.min_tokens for p in params):
                    raise ValueError("penalties and min_tokens need the rows' token histories")
                histories = [RowHistory((), ())] * len(params)
            logits = process_logits(
                raw, params, histories, stop_token_ids=self.stop_token_ids, allowed=allowed
            )
        token_ids = logits.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            chosen = self._sample_random(
                logits[rows], [params[i] for i in random_rows], [output_indices[i] for i in random_rows]
            )
            token_ids[rows] = chosen
        chosen_logprobs = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
        return SamplerOutput(
            token_ids=token_ids.tolist(),
            logprobs=chosen_logprobs.tolist(),
            top_logprobs=_top_logprobs(raw_logprobs, params),
        )

    def _sample_random(
        self, logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int]
    ) -> torch.Tensor:
        temperatures = torch.tensor([p.temperature for p in params], device=logits.device)
        scaled = logits / temperatures[:, None]
        if any(p.min_p > 0 for p in params):
            # min_p: drop tokens less likely than min_p times the most likely one (after temperature).
            probs = torch.softmax(scaled, dim=-1)
            min_p = torch.tensor([p.min_p for p in params], device=logits.device)
            threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
            scaled = scaled.masked_fill(probs < threshold, float("-inf"))
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            scaled = scaled.masked_fill(self._filtered_out(scaled, params), float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        noise = self._exponential_noise(probs, params, output_indices)
        # Exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. is a sample from p.
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _filtered_out(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Boolean mask of the tokens top-k and top-p remove. Rows without either keep all, so
        a row is treated the same whatever else is in the batch."""
        vocab_size = logits.shape[-1]
        device = logits.device
        # In descending order top-k keeps a prefix, and top-p keeps a prefix of that.
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        positions = torch.arange(vocab_size, device=device)
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in params], device=device)
        removed = positions[None, :] >= top_k[:, None]
        probs = torch.softmax(sorted_logits.masked_fill(removed, float("-inf")), dim=-1)
        # Drop a token once the mass strictly before it already reaches top_p; the first stays.
        mass_before = probs.cumsum(dim=-1) - probs
        top_p = torch.tensor([p.top_p for p in params], device=device)
        removed |= mass_before >= top_p[:, None]
        return torch.zeros_like(removed).scatter_(1, order, removed)

    def _exponential_noise(
        self, probs: torch.Tensor, params: list[SamplingParams], output_indices: list[int]
    ) -> torch.Tensor:
        noise = torch.empty_like(probs)
        unseeded = [i for i, p in enumerate(params) if p.seed is None]
        if unseeded:
            rows = torch.tensor(unseeded, device=probs.device)
            noise[rows] = torch.empty(
                (len(unseeded), probs.shape[-1]), device=probs.device, dtype=probs.dtype
            ).exponential_(generator=self._shared_generator(probs.device))
        for i, p in enumerate(params):
            if p.seed is not None:
                generator = torch.Generator(device=probs.device)
                generator.manual_seed(derive_seed(p.seed, output_indices[i]))
                noise[i].exponential_(generator=generator)
        # exponential_ may return exactly 0; keep p / E finite.
        return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def _top_logprobs(
    raw_logprobs: torch.Tensor, params: SequenceOf[SamplingParams]
) -> list[list[tuple[int, float]]]:
    k_max = max((p.top_logprobs for p in params), default=0)
    if k_max == 0:
        return [[] for _ in params]
    values, ids = raw_logprobs.topk(min(k_max, raw_logprobs.shape[-1]), dim=-1)
    rows_values, rows_ids = values.tolist(), ids.tolist()
    return [
        list(zip(rows_ids[i][: p.top_logprobs], rows_values[i][: p.top_logprobs], strict=True))
        for i, p in enumerate(params)
    ]
