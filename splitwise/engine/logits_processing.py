"""Batched logits processing before sampling: one tensor op per feature over the whole batch.

Rows that do not use a feature are left bit-identical (a row is processed the same whatever else is
in the batch). Token histories live in tensors that grow in place as tokens arrive
(``TokenHistory``: no per-step list -> tensor conversion of whole histories), and are flattened
once per step (no per-row tensor math)::

    flat ids:   [ r0 t0, r0 t1, r0 t2 | r1 t0 | r2 t0, r2 t1 ]
    row index:  [ 0,     0,     0     | 1     | 2,     2     ]
    counts[row, id] += 1  via index_put_(accumulate=True)

Order (vLLM's): allowed_token_ids and the structured-output mask, min_tokens (stop tokens
masked), logit_bias, then repetition / frequency / presence penalties.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

import torch

from splitwise.engine.sampling_params import SamplingParams

TokenIds = SequenceOf[int] | torch.Tensor


@dataclass(frozen=True)
class RowHistory:
    """The tokens a row's request has so far (penalties and min_tokens read them): lists, or the
    int64 tensors of a ``TokenHistory``."""

    prompt_token_ids: TokenIds
    output_token_ids: TokenIds


class TokenHistory:
    """One request's prompt and output token ids as CPU int64 tensors; ``sync`` appends only the
    tokens that arrived since the last call (capacity doubles, as a list's does)."""

    def __init__(self, prompt_token_ids: SequenceOf[int]) -> None:
        self.prompt = torch.tensor(list(prompt_token_ids), dtype=torch.int64)
        self._output = torch.empty(16, dtype=torch.int64)
        self._num_output = 0

    def sync(self, output_token_ids: SequenceOf[int]) -> RowHistory:
        n = len(output_token_ids)
        if n < self._num_output:  # never happens for one request; stay correct anyway
            self._num_output = 0
        if n > self._output.numel():
            grown = torch.empty(max(n, 2 * self._output.numel()), dtype=torch.int64)
            grown[: self._num_output] = self._output[: self._num_output]
            self._output = grown
        if n > self._num_output:
            self._output[self._num_output : n] = torch.tensor(
                list(output_token_ids[self._num_output : n]), dtype=torch.int64
            )
            self._num_output = n
        return RowHistory(self.prompt, self._output[:n])


def _as_tensor(ids: TokenIds) -> torch.Tensor:
    return ids if isinstance(ids, torch.Tensor) else torch.tensor(list(ids), dtype=torch.int64)


def _scatter_rows(
    rows: list[int], ids: SequenceOf[TokenIds], shape: tuple[int, int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened (row index, token id) of ``ids[i]`` for batch row ``rows[i]``; ids >= vocab dropped."""
    if any(isinstance(t, torch.Tensor) for t in ids):  # histories: concatenate the tensors
        parts = [_as_tensor(t) for t in ids]
        flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
        lengths = torch.tensor([p.numel() for p in parts], dtype=torch.int64)
        row_index = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64), lengths)
    else:  # short lists (stop ids, logit_bias keys): one conversion for the whole batch
        flat = torch.tensor([t for seq in ids for t in seq], dtype=torch.int64)
        row_index = torch.tensor(
            [r for r, seq in zip(rows, ids, strict=True) for _ in seq], dtype=torch.int64
        )
    keep = (flat >= 0) & (flat < shape[1])
    return row_index[keep].to(device), flat[keep].to(device)


def token_mask(
    rows: list[int], ids: SequenceOf[TokenIds], shape: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Bool [batch, vocab], True at ``ids[i]`` of row ``rows[i]``."""
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    if rows:
        row_index, flat = _scatter_rows(rows, ids, shape, device)
        mask[row_index, flat] = True
    return mask


def token_counts(
    rows: list[int], ids: SequenceOf[TokenIds], shape: tuple[int, int], device: torch.device
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

    Only masks are dense [batch, vocab] ops; min_tokens, logit_bias and the penalties touch just
    the (row, token) positions they name, through a flat view (position = row * vocab + token), so
    their cost grows with the histories, not with the vocabulary.
    """
    shape = (logits.shape[0], logits.shape[1])
    device = logits.device
    out = logits.clone()
    flat = out.view(-1)
    restricted = [i for i, p in enumerate(params) if p.allowed_token_ids]
    if restricted:
        keep = token_mask(restricted, [params[i].allowed_token_ids for i in restricted], shape, device)
        unrestricted = torch.ones(shape[0], dtype=torch.bool, device=device)
        unrestricted[restricted] = False
        out.masked_fill_(~(keep | unrestricted[:, None]), float("-inf"))
    if allowed is not None:
        out.masked_fill_(~allowed, float("-inf"))
    early = [
        i
        for i, (p, h) in enumerate(zip(params, histories, strict=True))
        if len(h.output_token_ids) < p.min_tokens
    ]
    # min_tokens must not leave a row with nothing to sample (a finished grammar allows only eos):
    # such a row falls back to its mask without the min_tokens rule. Only masks can cause that.
    structural = out.clone() if early and (allowed is not None or restricted) else None
    if early:
        stops = [
            tuple(params[i].stop_token_ids) + tuple(() if params[i].ignore_eos else stop_token_ids)
            for i in early
        ]
        flat[_positions(early, stops, shape, device)] = float("-inf")
    biased = [i for i, p in enumerate(params) if p.logit_bias]
    if biased:
        ids = [[t for t, _ in params[i].logit_bias] for i in biased]
        values = [b for i in biased for t, b in params[i].logit_bias if 0 <= t < shape[1]]
        flat.index_put_(
            (_positions(biased, ids, shape, device),),
            torch.tensor(values, dtype=out.dtype, device=device),
            accumulate=True,
        )
    penalised = [i for i, p in enumerate(params) if p.has_penalties]
    if penalised:
        _apply_penalties(flat, shape, params, histories, penalised)
    if structural is not None:
        dead = torch.isinf(out).all(dim=-1)
        if bool(dead.any()):
            out[dead] = structural[dead]
    return out


def _positions(
    rows: list[int], ids: SequenceOf[TokenIds], shape: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Flat positions ``row * vocab + token`` of ``ids[i]`` in row ``rows[i]``."""
    row_index, token = _scatter_rows(rows, ids, shape, device)
    return row_index * shape[1] + token


def _apply_penalties(
    flat: torch.Tensor,
    shape: tuple[int, int],
    params: SequenceOf[SamplingParams],
    histories: SequenceOf[RowHistory],
    rows: list[int],
) -> None:
    """vLLM's order: repetition (CTRL's: prompt and output tokens; positive logits shrink,
    negative grow), then presence (once per token in the output) and frequency (per occurrence)."""
    device = flat.device
    vocab = shape[1]
    num_rows = shape[0]
    # Repeated positions need no unique(): an indexed *assignment* computed from the original
    # values writes the same result for every copy (applied once: repetition, presence), and an
    # accumulating index_put_ adds once per occurrence (frequency).
    output_positions = _positions(rows, [histories[i].output_token_ids for i in rows], shape, device)

    def per_row(name: str, default: float) -> torch.Tensor:
        values = torch.full((num_rows,), default, dtype=flat.dtype)
        values[rows] = torch.tensor([getattr(params[i], name) for i in rows], dtype=flat.dtype)
        return values.to(device)

    repeating = [i for i in rows if params[i].repetition_penalty != 1.0]
    if repeating:
        prompt_positions = _positions(
            repeating, [histories[i].prompt_token_ids for i in repeating], shape, device
        )
        seen = torch.cat([output_positions, prompt_positions])
        factor = per_row("repetition_penalty", 1.0)[seen // vocab]
        values = flat[seen]
        flat[seen] = torch.where(values > 0, values / factor, values * factor)
    output_rows = output_positions // vocab
    presence = per_row("presence_penalty", 0.0)[output_rows]
    flat[output_positions] = flat[output_positions] - presence
    frequency = per_row("frequency_penalty", 0.0)[output_rows]
    flat.index_put_((output_positions,), -frequency, accumulate=True)
