"""NodeRuntime: takes work from the scheduler agent and serves it on the engine worker.

    next_work -> (mixed: run here | disagg: decode flow drives P) -> publish chunks -> terminal -> ack

Every work item ends with exactly one terminal result (finished or error) published to its
frontend, or, when the frontend cancelled it, with an ack and nothing more (the frontend already
ended the client's stream). A re-dispatched item continues after ``resume_token_ids`` (the tokens
the client already has): they are appended to the prompt and counted against ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

from scheduler.errors import SchedulerClosedError, SchedulerError
from scheduler.interfaces import NodeSide  # the scheduler's node side (NodeAgent or LocalNode)
from scheduler.messages import Failed, Finished, ResultMessage, TokenChunk, WorkItem
from splitwise.codes import FailureCode, Mode
from splitwise.engine.errors import EngineError, InvalidRequestError
from splitwise.engine.outputs import RequestOutput
from splitwise.engine.prompt_logprobs import to_wire as prompt_logprobs_to_wire
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import FinishReason
from splitwise.errors import SplitwiseError
from splitwise.instance.engine_worker import EngineWorker
from splitwise.logging import bind_request, get_logger
from splitwise.planner.latency import RollingLatency

log = get_logger(__name__)


class DisaggDecoder(Protocol):
    """The decode-side P/D flow (splitwise/instance/decode_flow.py)."""

    async def start_request(
        self, item: WorkItem, prompt: list[int], params: SamplingParams
    ) -> asyncio.Queue[RequestOutput]: ...
    def cancel(self, req_id: str) -> bool: ...  # True: the flow frees the request's blocks itself

    last_transfer: dict[str, str]  # req_id -> what the KV transfer did, taken once by the runtime
    last_local: dict[str, str]  # req_id -> why it was prefilled locally by choice, taken once


@dataclasses.dataclass(frozen=True)
class PreparedRequest:
    prompt_token_ids: list[int]
    params: SamplingParams
    first_index: int  # index of the first token this attempt produces in the client's stream
    # The tokens already delivered end the request (max_tokens reached, or a stop token): the
    # attempt answers at once instead of generating one more (FinishReason value).
    finished_by: str | None = None


def prepare(item: WorkItem, eos_token_ids: frozenset[int] = frozenset()) -> PreparedRequest:
    """The item's sampling params (typed and validated by the codec), adjusted for tokens already
    delivered (re-dispatch). Delivered tokens that already end the request (max_tokens, a stop
    token or the model's eos past min_tokens, as the engine's StopChecker decides) finish it here."""
    params = item.sampling_params
    resumed = list(item.resume_token_ids)
    prompt = list(item.prompt_token_ids) + resumed
    if not resumed:
        return PreparedRequest(prompt, params, 0)
    if len(resumed) >= params.max_tokens:
        return PreparedRequest(prompt, params, len(resumed), finished_by=FinishReason.LENGTH.value)
    last = resumed[-1]
    stops = last in params.stop_token_ids or (not params.ignore_eos and last in eos_token_ids)
    if stops and len(resumed) >= params.min_tokens:
        return PreparedRequest(prompt, params, len(resumed), finished_by=FinishReason.STOP.value)
    params = dataclasses.replace(
        params,
        max_tokens=params.max_tokens - len(resumed),
        min_tokens=max(0, params.min_tokens - len(resumed)),
    )
    return PreparedRequest(prompt, params, len(resumed))


class NodeRuntime:
    def __init__(
        self,
        node: NodeSide,
        worker: EngineWorker,
        *,
        decoder: DisaggDecoder | None = None,
        latency: RollingLatency | None = None,
    ) -> None:
        self.node = node
        self.worker = worker
        self.decoder = decoder
        self.latency = latency or RollingLatency()  # TTFT / ITL p90 for the LoadReport (planner)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._loops: list[asyncio.Task[None]] = []
        # Drain (splitwise/instance/drain.py): False = every new item is handed back at once.
        self.accepting = True
        self._handing_back: dict[str, str] = {}  # req_id -> why its serve task was cancelled
        self._streaming: set[str] = set()  # requests that produced a token on this node

    async def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._work_loop(), name="node-work"),
            asyncio.create_task(self._cancel_loop(), name="node-cancel"),
        ]

    async def close(self) -> None:
        for task in [*self._loops, *self._tasks.values()]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks.values(), return_exceptions=True)

    @property
    def num_in_flight(self) -> int:
        return len(self._tasks)

    def in_flight(self) -> list[str]:
        return list(self._tasks)

    def is_streaming(self, req_id: str) -> bool:
        """``req_id`` produced tokens here (running); False: still queued or prefilling."""
        return req_id in self._streaming

    def hand_back(self, req_id: str, reason: str) -> bool:
        """Stop serving ``req_id`` and answer its frontend with a retryable ``node_draining`` error:
        it re-dispatches the request with the tokens its client has (no client-visible error)."""
        task = self._tasks.get(req_id)
        if task is None or task.done() or req_id in self._handing_back:
            return False
        self._handing_back[req_id] = reason
        task.cancel()
        return True

    async def wait_idle(self, req_ids: list[str]) -> None:
        """Until the serve tasks of ``req_ids`` ended."""
        tasks = [t for r in req_ids if (t := self._tasks.get(r)) is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- loops --------------------------------------------------------------------------------

    async def _work_loop(self) -> None:
        while True:
            try:
                item = await self.node.next_work()
            except SchedulerClosedError:
                return
            task = asyncio.create_task(self._serve(item), name=f"serve-{item.req_id}")
            self._tasks[item.req_id] = task
            task.add_done_callback(self._forget_task(item.req_id))

    def _forget_task(self, req_id: str) -> Callable[[asyncio.Task[None]], None]:
        def forget(_task: asyncio.Task[None]) -> None:
            self._tasks.pop(req_id, None)
            self._streaming.discard(req_id)
            self._handing_back.pop(req_id, None)  # it ended before the cancel reached it

        return forget

    async def _cancel_loop(self) -> None:
        async for cancel in self.node.cancellations():
            log.info("request cancelled by frontend", req_id=cancel.req_id, reason=cancel.reason)
            # Before admission a prefill node may still write into the request's reserved blocks:
            # the decode flow releases them once it cannot (an engine abort would free them now).
            if self.decoder is not None and self.decoder.cancel(cancel.req_id):
                continue
            self.worker.abort(cancel.req_id)

    # -- one request --------------------------------------------------------------------------

    async def _serve(self, item: WorkItem) -> None:
        with bind_request(item.req_id, attempt=item.attempt):
            try:
                await self._serve_inner(item)
            except asyncio.CancelledError:
                self.worker.abort(item.req_id)
                reason = self._handing_back.pop(item.req_id, None)
                if reason is None:
                    raise
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()  # we asked for it: the hand-back answer still goes out
                log.info("request handed back to its frontend", reason=reason)
                await self._terminal(item, _failed(item, FailureCode.NODE_DRAINING, reason, True))
            except SplitwiseError as exc:  # deliberate: bad input, no capacity, remote prefill failed
                log.warning("request failed", error=str(exc), retryable=exc.retryable)
                await self._terminal(item, _failed(item, _failure_code(exc), str(exc), exc.retryable))
            except Exception as exc:  # noqa: BLE001 - this request's error boundary: a bug
                log.exception("request failed with an internal error", error=str(exc))
                message = f"internal error: {type(exc).__name__}: {exc}"
                await self._terminal(item, _failed(item, FailureCode.INTERNAL, message))

    async def _serve_inner(self, item: WorkItem) -> None:
        started_s = self.latency.clock()  # TTFT on this node counts from here (P's queue included)
        if not self.accepting:
            log.info("request handed back at once: this node is draining")
            await self._terminal(item, _failed(item, FailureCode.NODE_DRAINING, "node is draining", True))
            return
        req = prepare(item, self.worker.eos_token_ids)  # params were validated by the codec
        if req.finished_by is not None:
            # Its node died after the last token but before the terminal: nothing is left to generate.
            await self._terminal(item, _finished(item, req.finished_by, completion_tokens=req.first_index))
            return
        if item.assignment.mode == Mode.DISAGG:
            if self.decoder is None:
                raise EngineError("this node cannot decode disaggregated requests (role is not decode)")
            outputs = await self.decoder.start_request(item, req.prompt_token_ids, req.params)
            transferred = self.decoder.last_transfer.pop(item.req_id, None)
            local = self.decoder.last_local.pop(item.req_id, None)
            if transferred is not None:
                await self.node.mark(item.req_id, "transferred", detail=transferred)
            how = "remote prefill" if transferred else "local prefill (fallback)"
            await self.node.mark(item.req_id, "decoding", detail=f"local prefill ({local})" if local else how)
        else:
            outputs = self.worker.submit(item.req_id, req.prompt_token_ids, req.params)
            await self.node.mark(item.req_id, "running")
        await self._stream(item, req, outputs, started_s)

    async def _stream(
        self, item: WorkItem, req: PreparedRequest, outputs: asyncio.Queue[RequestOutput], started_s: float
    ) -> None:
        index = req.first_index
        clock = self.latency.clock
        last_s: float | None = None
        while True:
            batch = [await outputs.get()]
            while not batch[-1].finished and not outputs.empty():
                batch.append(outputs.get_nowait())  # coalesce what is ready into one chunk
            tokens = [t for out in batch for t in out.new_token_ids]
            logprobs = [lp for out in batch for lp in out.new_logprobs]
            tops = [top for out in batch for top in out.new_top_logprobs]
            has_tops = any(tops)
            if tokens:
                self._streaming.add(item.req_id)
                await self.node.publish(
                    TokenChunk(
                        req_id=item.req_id,
                        attempt=item.attempt,
                        index=index,
                        token_ids=tokens,
                        logprobs=logprobs,
                        top_token_ids=[[t for t, _ in top] for top in tops] if has_tops else None,
                        top_logprobs=[[lp for _, lp in top] for top in tops] if has_tops else None,
                        **_prompt_logprobs_fields(batch),
                    ),
                    frontend_id=item.frontend_id,
                )
                index += len(tokens)
                now_s = clock()
                if last_s is None:
                    self.latency.first_token(now_s - started_s)
                else:
                    self.latency.tokens(now_s - last_s, len(tokens))
                last_s = now_s
            last = batch[-1]
            if last.finished:
                await self._finish(item, last, completion_tokens=index)
                return

    async def _finish(self, item: WorkItem, out: RequestOutput, *, completion_tokens: int) -> None:
        if out.error is not None:
            result: ResultMessage | None = _failed(item, FailureCode.ENGINE_ERROR, out.error)
        elif out.finish_reason is FinishReason.ABORT:
            result = None  # cancelled by the frontend: it already ended the stream
        else:
            assert out.finish_reason is not None
            result = _finished(item, out.finish_reason.value, completion_tokens=completion_tokens)
        await self._terminal(item, result)

    async def _terminal(self, item: WorkItem, result: ResultMessage | None) -> None:
        try:
            if result is not None:
                await self.node.publish(result, frontend_id=item.frontend_id)
            await self.node.mark(item.req_id, "finished" if isinstance(result, Finished) else "ended")
            await self.node.ack(item)
        except SchedulerError as exc:
            # Redis stayed away past the dead-after time: the frontend re-dispatches or fails it.
            log.warning("could not report terminal result", error=str(exc))


def _failed(item: WorkItem, code: FailureCode, message: str, retryable: bool = False) -> Failed:
    return Failed(req_id=item.req_id, attempt=item.attempt, code=code, message=message, retryable=retryable)


def _finished(item: WorkItem, finish_reason: str, *, completion_tokens: int) -> Finished:
    return Finished(
        req_id=item.req_id,
        attempt=item.attempt,
        finish_reason=finish_reason,
        prompt_tokens=len(item.prompt_token_ids),
        completion_tokens=completion_tokens,
    )


def _prompt_logprobs_fields(batch: list[RequestOutput]) -> dict[str, Any]:
    first = next((out.prompt_logprobs for out in batch if out.prompt_logprobs is not None), None)
    names = ("prompt_logprobs", "prompt_top_token_ids", "prompt_top_logprobs")
    return dict(zip(names, prompt_logprobs_to_wire(first), strict=True))


def _failure_code(exc: SplitwiseError) -> FailureCode:
    """The one place a deliberate failure gets its code (``FailureCode``, a closed set)."""
    from splitwise.instance.decode_flow import DecodeCapacityError, PrefillUnavailable

    if isinstance(exc, InvalidRequestError):
        return FailureCode.INVALID_REQUEST
    if isinstance(exc, DecodeCapacityError):
        return FailureCode.DECODE_CAPACITY
    if isinstance(exc, PrefillUnavailable):
        return FailureCode.PREFILL_UNAVAILABLE
    return FailureCode.ENGINE_ERROR
