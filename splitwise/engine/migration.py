"""Live migration of a decoding sequence between two engines (engine-thread calls only).

Source engine::

    blocks_of(req_id)   -> the block table now (pre-copy rounds read full blocks while it decodes)
    pause(req_id)       -> RunningState (out of the batch between two steps, blocks kept)
    resume(req_id)      (the migration failed: back into the running batch, nothing lost)
    drop(req_id)        (it runs on the target now: blocks freed, no output of its own)

Target engine::

    (reserve(req_id, num_tokens) as for a prefilled request; the transport fills the blocks)
    admit(engine, state) -> the sequence joins the batch with its whole output history

What carries the sampler state across: the output token ids (the next token is sampled after
them, its KV not computed yet: exactly one uncomputed token, as a prefilled request), the request's
own SamplingParams (seeded rows draw by (seed, output index): the index continues), the grammar
matcher re-created and advanced by every output token, and the text stream primed with them (stop
strings that span the switch still match).
"""

from __future__ import annotations

from dataclasses import dataclass

from splitwise.engine.engine import LLMEngine
from splitwise.engine.errors import InvalidRequestError, UnknownRequestError
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import Sequence
from splitwise.engine.text_stream import TextStream


@dataclass(frozen=True)
class BlockView:
    """Where a sequence's KV lives now. ``num_full_blocks`` blocks are complete and no longer written
    (decoding only appends): a pre-copy round may read them while the sequence keeps decoding."""

    block_ids: tuple[int, ...]
    num_computed_tokens: int
    num_full_blocks: int
    num_preemptions: int  # changes when its blocks were dropped (then every copy so far is void)


@dataclass(frozen=True)
class RunningState:
    """A paused sequence: everything the target needs besides its KV."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    num_computed_tokens: int
    blocks: BlockView


def blocks_of(engine: LLMEngine, req_id: str) -> BlockView | None:
    """The block table of a decoding sequence (None when it is not decoding now)."""
    seq = engine.scheduler.get(req_id)
    if seq is None or seq.is_finished or not seq.block_table or seq.num_uncomputed_tokens != 1:
        return None
    return _view(seq, engine.config.block_size)


def running_blocks(engine: LLMEngine) -> list[tuple[str, int]]:
    """(req_id, blocks held) of every running sequence, in admission order (migration policies)."""
    return [(seq.req_id, len(seq.block_table)) for seq in engine.scheduler.running]


def pause(engine: LLMEngine, req_id: str) -> RunningState | None:
    """Stop a decoding sequence between two steps (None: it is not decoding right now)."""
    seq = engine.scheduler.pause(req_id)
    if seq is None:
        return None
    return RunningState(
        req_id=req_id,
        prompt_token_ids=list(seq.prompt_token_ids),
        output_token_ids=list(seq.output_token_ids),
        params=seq.params,
        num_computed_tokens=seq.num_computed_tokens,
        blocks=_view(seq, engine.config.block_size),
    )


def resume(engine: LLMEngine, req_id: str) -> None:
    engine.scheduler.resume(req_id)


def drop(engine: LLMEngine, req_id: str) -> None:
    """The target owns the sequence now: free its blocks and its per-request sampling state."""
    engine.scheduler.drop_paused(req_id)
    engine._texts.pop(req_id, None)
    engine._forget(req_id)


def admit(engine: LLMEngine, state: RunningState) -> None:
    """Admit a migrated sequence whose KV (``num_computed_tokens`` of it) landed in its reservation."""
    req_id = state.req_id
    engine.validate_prompt(state.prompt_token_ids, req_id=req_id)
    if not state.output_token_ids:
        raise InvalidRequestError("a migrated sequence has at least one output token", req_id=req_id)
    if not engine.block_manager.has_reservation(req_id):
        raise UnknownRequestError("no KV reservation for this request", req_id=req_id)
    matcher = engine._new_matcher(state.params, req_id=req_id, accepted=list(state.output_token_ids))
    seq = Sequence(req_id=req_id, prompt_token_ids=list(state.prompt_token_ids), params=state.params)
    seq.output_token_ids.extend(state.output_token_ids)
    seq.output_logprobs.extend([0.0] * len(state.output_token_ids))  # only each new token's is read
    seq.num_computed_tokens = state.num_computed_tokens
    engine.scheduler.add_prefilled(seq)  # exactly one uncomputed token: the last output's
    if engine._wants_text(state.params):
        text = TextStream(engine.tokenizer, seq.prompt_token_ids, state.params)
        for token_id in state.output_token_ids:
            text.push(token_id, engine.stop_checker)
        engine._texts[req_id] = text
    if matcher is not None:
        engine._matchers[req_id] = matcher


def _view(seq: Sequence, block_size: int) -> BlockView:
    return BlockView(
        block_ids=tuple(seq.block_table),
        num_computed_tokens=seq.num_computed_tokens,
        num_full_blocks=min(seq.num_computed_tokens // block_size, len(seq.block_table)),
        num_preemptions=seq.num_preemptions,
    )
