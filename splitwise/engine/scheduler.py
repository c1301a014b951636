"""Engine-local continuous batching with chunked prefill, prefix caching and preemption.

One step::

    schedule()                -> SchedulerOutput (chunks to run, sequences preempted/failed)
    model runner + sampler    -> sampled {req_id: (token_id, logprob)}
    postprocess(out, sampled) -> PostprocessResult (sequences given a token, sequences finished)

Queues::

    prefilled  sequences whose KV was written from outside (disaggregated decode); hold blocks
    waiting    FIFO of sequences without KV (new, or preempted: at the front, to recompute)
    running    admission order; prefilling chunk by chunk or decoding
    held       prefill-only sequences that finished with PREFILL_DONE and keep their blocks
               until the engine calls ``release_prefilled`` (the KV transfer is acknowledged)

Budgets per step: ``max_num_batched_tokens`` tokens, ``max_num_seqs`` running sequences, and the
free blocks. Order: decodes, then running prefills, then admissions. When blocks run out the most
recently admitted running sequence is preempted (blocks dropped, recomputed later).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from splitwise.engine.block_manager import NO_MATCH, BlockManager
from splitwise.engine.errors import InvalidRequestError, UnknownRequestError
from splitwise.engine.model_runner import ScheduledChunk
from splitwise.engine.sequence import FinishReason, Sequence, SequenceStatus
from splitwise.engine.stop_checker import StopChecker


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    # Lost their KV this step; back in ``waiting`` to recompute prompt and outputs.
    preempted: list[Sequence] = field(default_factory=list)
    # Cannot fit in the whole KV pool even alone: FINISHED with ABORT, blocks freed. The engine
    # reports them to their clients as OutOfBlocksError.
    failed: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(chunk.num_new_tokens for chunk in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass
class PostprocessResult:
    sampled: list[Sequence] = field(default_factory=list)  # got a new output token this step
    finished: list[Sequence] = field(default_factory=list)  # finished this step (subset of sampled)


@dataclass
class _Step:
    """Mutable state of one ``schedule()`` call."""

    budget_tokens: int
    scheduled: dict[str, ScheduledChunk] = field(default_factory=dict)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        self.scheduled[seq.req_id] = ScheduledChunk(seq=seq, num_new_tokens=num_new_tokens)
        self.budget_tokens -= num_new_tokens

    def unschedule(self, seq: Sequence) -> None:
        chunk = self.scheduled.pop(seq.req_id, None)
        if chunk is not None:
            self.budget_tokens += chunk.num_new_tokens


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        stop_checker: StopChecker,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"--max-num-seqs: {max_num_seqs} must be >= 1")
        if max_num_batched_tokens < 1:
            raise ValueError(f"--max-num-batched-tokens: {max_num_batched_tokens} must be >= 1")
        self.block_manager = block_manager
        self.stop_checker = stop_checker
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self._prefilled: deque[Sequence] = deque()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._held: dict[str, Sequence] = {}
        # Decoding sequences a live migration stopped between two steps: they keep their blocks
        # and are never scheduled until ``resume`` (the migration failed) or ``drop_paused``.
        self._paused: dict[str, Sequence] = {}

    # -- queries ------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + len(self._prefilled)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def running(self) -> tuple[Sequence, ...]:
        """The running batch in admission order (a copy: read-only)."""
        return tuple(self._running)

    @property
    def num_held(self) -> int:
        return len(self._held)

    @property
    def num_queued_prefill_tokens(self) -> int:
        """The prefill backlog: tokens still to compute for sequences that are not decoding yet."""
        waiting = sum(s.num_uncomputed_tokens for s in self._waiting)
        return waiting + sum(s.num_uncomputed_tokens for s in self._running if s.num_uncomputed_tokens > 1)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._prefilled or self._running)

    def get(self, req_id: str) -> Sequence | None:
        """The unfinished or held sequence with this id."""
        for queue in (self._running, self._waiting, self._prefilled):
            for seq in queue:
                if seq.req_id == req_id:
                    return seq
        return self._held.get(req_id) or self._paused.get(req_id)

    # -- entering -----------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (no KV yet) at the back of ``waiting``."""
        self._check_new(seq)
        if seq.block_table or seq.num_computed_tokens:
            raise InvalidRequestError("a new sequence must not hold KV", req_id=seq.req_id)
        self._check_fits_pool(seq)
        seq.status = SequenceStatus.WAITING
        self._waiting.append(seq)

    def add_prefilled(self, seq: Sequence) -> None:
        """Queue a sequence whose KV was written from outside into a reservation.

        The engine reserved ``block_manager.reserve(seq.req_id, ...)``, the transport wrote the
        prompt's KV, and ``seq`` has ``num_computed_tokens`` = prompt length and its first output
        token appended. The sequence adopts the reservation and decodes once admitted (ahead of
        ``waiting``: it already holds blocks, and nothing can free them but running it).
        """
        self._check_new(seq)
        if seq.num_uncomputed_tokens != 1:
            raise InvalidRequestError(
                f"a prefilled sequence must have exactly 1 uncomputed token, has {seq.num_uncomputed_tokens}",
                req_id=seq.req_id,
            )
        self._check_fits_pool(seq)
        self.block_manager.adopt(seq)
        self.block_manager.mark_computed(seq)
        seq.status = SequenceStatus.WAITING
        self._prefilled.append(seq)

    def _check_new(self, seq: Sequence) -> None:
        if not seq.prompt_token_ids:
            raise InvalidRequestError("prompt is empty", req_id=seq.req_id)
        if self.get(seq.req_id) is not None:
            raise InvalidRequestError("request id is already in use", req_id=seq.req_id)

    def _check_fits_pool(self, seq: Sequence) -> None:
        num_needed = self.block_manager.num_blocks_for(seq.num_tokens)
        if num_needed > self.block_manager.num_blocks:
            raise InvalidRequestError(
                f"{seq.num_tokens} tokens need {num_needed} KV blocks; the pool has {self.block_manager.num_blocks}",
                req_id=seq.req_id,
            )

    # -- leaving ------------------------------------------------------------------------------

    def abort(self, req_id: str) -> Sequence:
        """Remove a sequence in any state (waiting, prefilling, decoding, held), free its blocks
        and finish it with ABORT."""
        seq = self._remove(req_id)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = FinishReason.ABORT
        return seq

    def finish(self, req_id: str, reason: FinishReason, *, stop_text: str | None = None) -> Sequence:
        """Finish a running sequence for a reason decided outside (a stop string). Frees blocks."""
        seq = next((s for s in self._running if s.req_id == req_id), None)
        if seq is None:
            raise UnknownRequestError("no running sequence with this id", req_id=req_id)
        seq.stop_text = stop_text
        self._finish(seq, reason)
        return seq

    def release_prefilled(self, req_id: str) -> Sequence:
        """Free the blocks of a held PREFILL_DONE sequence once its KV has been transferred."""
        seq = self._held.pop(req_id, None)
        if seq is None:
            raise UnknownRequestError("no prefilled sequence holds KV under this id", req_id=req_id)
        self.block_manager.free(seq)
        return seq

    # -- live migration (splitwise/engine/migration.py) ----------------------------------------

    def pause(self, req_id: str) -> Sequence | None:
        """Take a decoding sequence out of the running batch, keeping its blocks (None: it is not
        decoding right now: waiting, preempted, prefilling or unknown)."""
        seq = next((s for s in self._running if s.req_id == req_id), None)
        if seq is None or seq.num_uncomputed_tokens != 1:
            return None
        self._running.remove(seq)
        self._paused[req_id] = seq
        return seq

    def resume(self, req_id: str) -> Sequence:
        """Put a paused sequence back at the end of the running batch (its migration failed)."""
        seq = self._paused.pop(req_id, None)
        if seq is None:
            raise UnknownRequestError("no paused sequence with this id", req_id=req_id)
        self._running.append(seq)
        return seq

    def drop_paused(self, req_id: str) -> Sequence:
        """Forget a paused sequence that now runs elsewhere and free its blocks."""
        seq = self._paused.pop(req_id, None)
        if seq is None:
            raise UnknownRequestError("no paused sequence with this id", req_id=req_id)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = FinishReason.ABORT
        return seq

    def _remove(self, req_id: str) -> Sequence:
        paused = self._paused.pop(req_id, None)
        if paused is not None:
            return paused
        for queue in (self._running, self._waiting, self._prefilled):
            for seq in queue:
                if seq.req_id == req_id:
                    queue.remove(seq)
                    return seq
        seq_held = self._held.pop(req_id, None)
        if seq_held is None:
            raise UnknownRequestError("no such request in this engine", req_id=req_id)
        return seq_held

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self._running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if reason is FinishReason.PREFILL_DONE:
            self._held[seq.req_id] = seq
        else:
            self.block_manager.free(seq)

    # -- schedule -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        step = _Step(budget_tokens=self.max_num_batched_tokens)
        self._schedule_running(step)
        if not step.preempted:  # admitting right after preempting would only thrash
            self._admit(step, self._prefilled)
            self._admit(step, self._waiting)
        return SchedulerOutput(
            chunks=list(step.scheduled.values()), preempted=step.preempted, failed=step.failed
        )

    def _schedule_running(self, step: _Step) -> None:
        # Decodes (1 token) first so a long prefill never stalls token streaming.
        decodes = [s for s in self._running if s.num_uncomputed_tokens == 1]
        prefills = [s for s in self._running if s.num_uncomputed_tokens > 1]
        for seq in decodes + prefills:
            if step.budget_tokens == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this step
                continue
            num_new_tokens = min(seq.num_uncomputed_tokens, step.budget_tokens)
            if self._make_room(seq, num_new_tokens, step):
                self.block_manager.allocate(seq, num_new_tokens)
                step.add(seq, num_new_tokens)

    def _make_room(self, seq: Sequence, num_new_tokens: int, step: _Step) -> bool:
        """Preempt later-admitted sequences until ``seq`` gets its blocks. False if it cannot run
        this step (then it has itself been preempted, or failed)."""
        while not self.block_manager.can_allocate(seq, num_new_tokens):
            victim = self._running[-1]
            if victim is seq:
                num_needed = self.block_manager.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
                if num_needed > self.block_manager.num_blocks:
                    self._fail(seq, step)
                else:  # others (reservations, held KV) hold the blocks; wait for them
                    self._preempt(seq, step)
                return False
            self._preempt(victim, step)
        return True

    def _preempt(self, seq: Sequence, step: _Step) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self._running.remove(seq)
        step.unschedule(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        seq.num_preemptions += 1
        # Victims go newest first, so the front of ``waiting`` keeps admission order.
        self._waiting.appendleft(seq)
        step.preempted.append(seq)

    def _fail(self, seq: Sequence, step: _Step) -> None:
        self._running.remove(seq)
        step.unschedule(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = FinishReason.ABORT
        step.failed.append(seq)

    def _admit(self, step: _Step, queue: deque[Sequence]) -> None:
        """Admit from the front of ``queue`` (strict FIFO) while budgets and blocks allow."""
        while queue and step.budget_tokens > 0 and len(self._running) < self.max_num_seqs:
            seq = queue[0]
            # Prompt logprobs need the logits of every prompt position: no prefix-cache hits.
            wants_all = seq.params.prompt_logprobs is not None
            prefix = NO_MATCH if wants_all else self.block_manager.match_prefix(seq)
            num_new_tokens = min(
                seq.num_tokens - max(prefix.num_tokens, seq.num_computed_tokens), step.budget_tokens
            )
            if not self.block_manager.can_allocate(seq, num_new_tokens, prefix):
                if queue is self._prefilled and not self._running and len(queue) > 1:
                    # No running sequence will free blocks, and queued prefilled sequences may
                    # hold them all: drop the newest one's KV (it recomputes) rather than deadlock.
                    self._preempt(queue.pop(), step)
                    continue
                return
            queue.popleft()
            self.block_manager.allocate(seq, num_new_tokens, prefix)
            seq.status = SequenceStatus.RUNNING
            self._running.append(seq)
            step.add(seq, num_new_tokens)

    # -- postprocess --------------------------------------------------------------------------

    def postprocess(
        self, output: SchedulerOutput, sampled: Mapping[str, tuple[int, float]]
    ) -> PostprocessResult:
        """Advance each chunk's sequence. Chunks that reached the end of ``token_ids`` must have a
        sampled ``(token_id, logprob)``; entries for partial prefill chunks are ignored.
        Sequences aborted since ``schedule()`` are skipped."""
        result = PostprocessResult()
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += chunk.num_new_tokens
            self.block_manager.mark_computed(seq)
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # a prefill chunk that did not reach the end: no logits to sample from
            if seq.req_id not in sampled:
                raise ValueError(
                    f"{seq.req_id}: the chunk reached the end of the sequence but no token was sampled"
                )
            token_id, logprob = sampled[seq.req_id]
            seq.output_token_ids.append(token_id)
            seq.output_logprobs.append(logprob)
            result.sampled.append(seq)
            # A prefill-only sequence always ends here holding its blocks, even when its first token
            # already ends the request: layer-pipelined sends may still be reading those blocks, and
            # the decode side decides (from the first token) whether the request stops.
            reason = FinishReason.PREFILL_DONE if seq.prefill_only else self.stop_checker.check_token(seq)
            if reason is not None:
                self._finish(seq, reason)
                result.finished.append(seq)
        return result
