"""Batched logits processing before sampling: one tensor op per feature over the whole batch.

Rows that do not use a feature are left bit-identical (a row is processed the same whatever else is
in the batch). Token histories arrive as Python lists and are turned into tensors once per step,
flattened (no per-row tensor ops)::

    flat ids:   [ r0 t0, r0 t1, r0 t2 | r1 t0 | r2 t0, r2 t1 ]
    row index:  [ 0,     0,     0     | 1     | 2,     2     ]   (repeat_interleave of lengths)
    counts[row, id] += 1  via index_put_(accumulate=True)

Order (vLLM's): allowed_token_ids and the structured-output mask, min_tokens (stop tokens
masked), logit_bias, then repetition / frequency / presence penalties.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

import torch

from splitwise.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class RowHistory:
    """The tokens a row's request has so far (penalties and min_tokens read them)."""

    prompt_token_ids: SequenceOf[int]
    output_token_ids: SequenceOf[int]


def _scatter_rows(
    rows: list[int], ids: SequenceOf[SequenceOf[int]], shape: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened (row index, token id) of ``ids[i]`` for batch row ``rows[i]``; ids >= vocab dropped."""
    lengths = torch.tensor([len(t) for t in ids], dtype=torch.int64)
    flat = torch.tensor([t for seq in ids for t in seq], dtype=torch.int64)
    row_index = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64), lengths)
    keep = (flat >= 0) & (flat < shape[1])
    return row_index[keep].to(device), flat[keep].to(device)


def token_mask(
    rows: list[int], ids: SequenceOf[SequenceOf[int]], shape: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Bool [batch, vocab], True at ``ids[i]`` of row ``rows[i]``."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    if rows:
        row_index, flat = _scatter_rows(rows, ids, shape, device)
        mask[row_index, flat] = True
    return mask


def token_counts(
    rows: list[int], ids: SequenceOf[SequenceOf[int]], shape: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Float [batch, vocab]: how often each token occurs in ``ids[i]`` of row ``rows[i]``."""
    counts = torch.zeros(shape, dtype=torch.float32, device=device)
    if rows:
        row_index, flat = _scatter_rows(rows, ids, shape, device)
        counts.index_put_((row_index, flat), torch.ones_like(flat, dtype=torch.float32), accumulate=True)
    return counts


def process_logits(
    logits: torch.Tensor,
    params: SequenceOf[SamplingParams],
    histories: SequenceOf[RowHistory],
    *,
    stop_token_ids: frozenset[int],
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The logits the sampler draws from (a new tensor; ``logits`` is not modified).

    ``allowed``: bool [batch, vocab] from the structured-output matchers (True = allowed), or None.
    ``stop_token_ids``: the model's eos ids, masked (with the row's stop_token_ids) under min_tokens.
    """
    shape = (logits.shape[0], logits.shape[1])
    device = logits.device
    out = logits.clone()
    restricted = [i for i, p in enumerate(params) if p.allowed_token_ids]
    if restricted:
        keep = token_mask(restricted, [params[i].allowed_token_ids for i in restricted], shape, device)
        unrestricted = torch.ones(shape[0], dtype=torch.bool, device=device)
        unrestricted[restricted] = False
        out.masked_fill_(~(keep | unrestricted[:, None]), float("-inf"))
    if allowed is not None:
        out.masked_fill_(~allowed, float("-inf"))
    structural = out.clone() if any(p.min_tokens for p in params) else None
    early = [
        i
        for i, (p, h) in enumerate(zip(params, histories, strict=True))
        if len(h.output_token_ids) < p.min_tokens
    ]
    if early:
        stops = [
            tuple(params[i].stop_token_ids) + tuple(() if params[i].ignore_eos else stop_token_ids)
            for i in early
        ]
        out.masked_fill_(token_mask(early, stops, shape, device), float("-inf"))
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    if biased:
        bias = torch.zeros(shape, dtype=out.dtype, device=device)
        ids = [[t for t, _ in params[i].logit_bias] for i in biased]
        row_index, flat = _scatter_rows(biased, ids, shape, device)
        values = torch.tensor(
            [b for i in biased for t, b in params[i].logit_bias if 0 <= t < shape[1]], dtype=out.dtype
        )
        bias.index_put_((row_index, flat), values.to(device), accumulate=True)
        out += bias
    penalised = [i for i, p in enumerate(params) if p.has_penalties]
    if penalised:
        out = _apply_penalties(out, params, histories, penalised)
    if structural is not None:
        # min_tokens must not leave a row with nothing to sample (a finished grammar allows only
        # eos): such a row falls back to its mask without the min_tokens rule.
        dead = torch.isinf(out).all(dim=-1)
        if bool(dead.any()):
            out[dead] = structural[dead]
    return out


def _apply_penalties(
    logits: torch.Tensor,
    params: SequenceOf[SamplingParams],
    histories: SequenceOf[RowHistory],
    rows: list[int],
) -> torch.Tensor:
    shape = (logits.shape[0], logits.shape[1])
    device = logits.device
    counts = token_counts(rows, [histories[i].output_token_ids for i in rows], shape, device)
    in_output = counts > 0
    repetition = torch.ones(shape[0], dtype=logits.dtype, device=device)
    frequency = torch.zeros(shape[0], dtype=logits.dtype, device=device)
    presence = torch.zeros(shape[0], dtype=logits.dtype, device=device)
    index = torch.tensor(rows, dtype=torch.int64, device=device)
    repetition[index] = torch.tensor(
        [params[i].repetition_penalty for i in rows], dtype=logits.dtype, device=device
    )
    frequency[index] = torch.tensor(
        [params[i].frequency_penalty for i in rows], dtype=logits.dtype, device=device
    )
    presence[index] = torch.tensor(
        [params[i].presence_penalty for i in rows], dtype=logits.dtype, device=device
    )
    repeating = [i for i in rows if params[i].repetition_penalty != 1.0]
    if repeating:
        # The repetition penalty (CTRL's) also covers the prompt; positive logits shrink, negative grow.
        seen = in_output | token_mask(
            repeating, [histories[i].prompt_token_ids for i in repeating], shape, device
        )
        factor = repetition[:, None]
        penalised = torch.where(logits > 0, logits / factor, logits * factor)
        logits = torch.where(seen, penalised, logits)
    return logits - frequency[:, None] * counts - presence[:, None] * in_output.to(logits.dtype)
