"""Prompt logprobs (``echo`` with ``logprobs``): the logprob of every prompt token after the first,
and its top-k alternatives, computed during the prefill from the logits of every prompt position.

Position ``i``'s logits predict token ``i + 1``; a chunk covering positions ``[start, start + n)``
scores tokens ``start + 1 .. start + n`` (those inside the prompt are kept)::

    prompt:   t0   t1   t2   t3 | first output
    logits:   p0   p1   p2   p3
    scores:        t1   t2   t3    (p3 predicts the first output token: that is sampling's job)

Requests that ask for them skip the prefix cache (cached positions have no logits), as in vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf

import torch

from splitwise.engine.model_runner import ScheduledChunk

# One prompt token's (logprob, [(token id, logprob) of its top-k alternatives]).
PromptLogprob = tuple[float, list[tuple[int, float]]]


def to_wire(
    values: list[PromptLogprob] | None,
) -> tuple[list[float] | None, list[list[int]] | None, list[list[float]] | None]:
    """The three parallel lists the P->D and node->frontend messages carry (None: not asked for)."""
    if values is None:
        return None, None, None
    return (
        [lp for lp, _ in values],
        [[t for t, _ in top] for _, top in values],
        [[v for _, v in top] for _, top in values],
    )


def from_wire(
    logprobs: list[float] | None, top_ids: list[list[int]] | None, top_logprobs: list[list[float]] | None
) -> list[PromptLogprob] | None:
    if logprobs is None:
        return None
    ids, values = top_ids or [[] for _ in logprobs], top_logprobs or [[] for _ in logprobs]
    return [(lp, list(zip(i, v, strict=True))) for lp, i, v in zip(logprobs, ids, values, strict=True)]


def wants_prompt_logprobs(chunk: ScheduledChunk) -> bool:
    seq = chunk.seq
    return seq.params.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens


class PromptLogprobs:
    """Per request, the prompt logprobs gathered so far (a prefill may span several chunks)."""

    def __init__(self) -> None:
        self._by_request: dict[str, list[PromptLogprob]] = {}

    def collect(self, chunks: SequenceOf[ScheduledChunk], all_logits: torch.Tensor) -> None:
        """``all_logits``: every new token's logits, chunk after chunk (``ModelRunner.forward(all_tokens=True)``)."""
        offset = 0
        for chunk in chunks:
            n = chunk.num_new_tokens
            if wants_prompt_logprobs(chunk):
                self._collect_one(chunk, all_logits[offset : offset + n])
            offset += n

    def _collect_one(self, chunk: ScheduledChunk, logits: torch.Tensor) -> None:
        seq = chunk.seq
        start = seq.num_computed_tokens
        if start == 0:  # first chunk, or a recompute after preemption: start over
            self._by_request[seq.req_id] = []
        scored = min(chunk.num_new_tokens, seq.num_prompt_tokens - 1 - start)
        if scored <= 0:
            return
        targets = torch.tensor(seq.prompt_token_ids[start + 1 : start + 1 + scored], dtype=torch.int64)
        logprobs = torch.log_softmax(logits[:scored].float(), dim=-1)
        chosen = logprobs.gather(1, targets[:, None].to(logprobs.device)).squeeze(1).tolist()
        k = seq.params.prompt_logprobs or 0
        if k > 0:
            values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
            tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        else:
            tops = [[] for _ in chosen]
        self._by_request[seq.req_id].extend(zip(chosen, tops, strict=True))

    def take(self, req_id: str) -> list[PromptLogprob] | None:
        return self._by_request.pop(req_id, None)

    def forget(self, req_id: str) -> None:
        self._by_request.pop(req_id, None)
