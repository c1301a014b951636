"""vLLM's per-request phase metrics and per-step token counts, measured on the node that runs the
request (the engine worker calls this on its thread; prometheus_client is thread-safe).

Phases of one request on this node, as vLLM defines them::

    arrival --queue--> first scheduled --prefill--> first token --decode--> last token
                       |<--------------------- inference -------------------------->|

A prefill-only request (P of a P/D pair) has no decode phase and no finish reason of its own (D
counts the request). A request admitted with its KV prefilled elsewhere (D) has no queue or
prefill phase here: its phases start at admission, with the first token P sampled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from splitwise.api.metrics import ApiMetrics
from splitwise.engine.engine import LLMEngine
from splitwise.engine.outputs import RequestOutput
from splitwise.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class _Phases:
    seq: Sequence | None  # the engine's record, until it is first scheduled
    arrival_s: float
    prefill_only: bool
    prefilled: bool = False  # admitted with its KV written by another node (D of a P/D pair)
    scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None


class RequestStats:
    def __init__(self, metrics: ApiMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics
        self.clock = clock
        self._requests: dict[str, _Phases] = {}
        self._unscheduled: set[str] = set()
        self._last_computed_tokens = 0

    def added(self, engine: LLMEngine, req_id: str, *, prefill_only: bool) -> None:
        """After ``engine.add_request``: the request waits in the engine's queue."""
        seq = engine.scheduler.get(req_id)
        if seq is None:
            return
        self._requests[req_id] = _Phases(seq, seq.arrival_s, prefill_only)
        self._unscheduled.add(req_id)

    def stepped(self, engine: LLMEngine) -> None:
        """After each engine step: tokens of the step, and which queued requests got scheduled."""
        computed = engine.stats.num_computed_tokens
        if computed > self._last_computed_tokens:
            self.metrics.iteration_tokens.observe(computed - self._last_computed_tokens)
        self._last_computed_tokens = computed
        now = self.clock()
        for req_id in list(self._unscheduled):
            phases = self._requests[req_id]
            seq = phases.seq
            if seq is not None and (seq.num_computed_tokens > 0 or seq.status is not SequenceStatus.WAITING):
                phases.scheduled_s, phases.seq = now, None
                self._unscheduled.discard(req_id)

    def delivered(self, outputs: Iterable[RequestOutput]) -> None:
        """Every output the worker hands to a request's queue."""
        now = self.clock()
        for out in outputs:
            phases = self._requests.get(out.req_id)
            if phases is None:  # admitted prefilled (D), or an abort of an unknown id
                if out.finished and not out.new_token_ids:
                    self._count_finish(out, prefill_only=False)
                    continue
                phases = _Phases(None, now, prefill_only=False, prefilled=True, scheduled_s=now)
                self._requests[out.req_id] = phases
            if out.new_token_ids:
                if phases.scheduled_s is None:
                    phases.scheduled_s = now
                if phases.first_token_s is None:
                    phases.first_token_s = now
                phases.last_token_s = now
            if out.finished:
                self._finish(out, phases, now)

    def _finish(self, out: RequestOutput, phases: _Phases, now: float) -> None:
        del self._requests[out.req_id]
        self._unscheduled.discard(out.req_id)
        m = self.metrics
        if phases.scheduled_s is not None:
            m.request_inference_time.observe(now - phases.scheduled_s)
            if not phases.prefilled:
                m.request_queue_time.observe(phases.scheduled_s - phases.arrival_s)
                if phases.first_token_s is not None:
                    m.request_prefill_time.observe(phases.first_token_s - phases.scheduled_s)
        if phases.first_token_s is not None and phases.last_token_s is not None and not phases.prefill_only:
            m.request_decode_time.observe(phases.last_token_s - phases.first_token_s)
        self._count_finish(out, prefill_only=phases.prefill_only)

    def _count_finish(self, out: RequestOutput, *, prefill_only: bool) -> None:
        reason = out.finish_reason
        if reason is None or reason is FinishReason.PREFILL_DONE or prefill_only:
            return
        self.metrics.request_success[reason.value].inc()
