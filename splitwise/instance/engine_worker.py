"""EngineWorker: runs one LLMEngine on its own thread, bridged to the instance's asyncio loop.

The engine is single-threaded and compute-bound, the HTTP server and the scheduler agent are
asyncio. The worker thread owns the engine; everything else talks to it through two doors:

- ``submit`` / ``abort``: a request's outputs arrive on its own ``asyncio.Queue``;
- ``call(fn)``: run ``fn(engine)`` on the engine thread between two steps and await its result;
  the P/D flows use the named wrappers (``validate_prompt``, ``reserve``, ``release_reservation``,
  ``admit_prefilled``, ``release_prefill``) and never see the engine object.

Loop: drain commands -> step (if there is work) -> deliver outputs. When idle it blocks on the
command queue (no busy loop). This thread is the engine's error boundary: a bug inside
``step()`` fails every in-flight request with an explicit error and the worker keeps serving.

Ownership: the event loop owns the output queues (``_queues``: created, routed to and removed only
on the loop); the engine thread owns the engine and ``_in_engine`` (the ids it holds). The engine
thread reaches the loop only by posting events (``call_soon_threadsafe``): one per step with that
step's outputs, one per ``call`` result. So a request id is never looked up on one thread while
the other replaces it, and a second request with the id of one whose last output is still on its
way is refused (EngineError) instead of receiving that output.

A *fatal* engine error (``exc.fatal``: a tensor-parallel rank is gone, #14) also fails them, then
stops stepping for good and reports to ``on_fatal`` (the instance exits non-zero); later requests
fail at once. A rank that exits while the engine is idle is reported the same way.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from splitwise.engine import migration
from splitwise.engine.engine import LLMEngine
from splitwise.engine.errors import EngineError, UnknownRequestError
from splitwise.engine.model_runner import LayerCallback
from splitwise.engine.outputs import RequestOutput
from splitwise.engine.parallel.runner import TPModelRunner
from splitwise.engine.prompt_logprobs import PromptLogprob
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import FinishReason
from splitwise.instance.request_stats import RequestStats
from splitwise.logging import get_logger

log = get_logger(__name__)
T = TypeVar("T")

_IDLE_WAIT_S = 0.5  # how long an idle worker sleeps on the command queue before re-checking `running`


@dataclass(frozen=True)
class LoadSnapshot:
    """What the node reports to the scheduler; refreshed after every step."""

    queued_prefill_tokens: int = 0
    running_requests: int = 0
    waiting_requests: int = 0
    free_kv_blocks: int = 0
    total_kv_blocks: int = 0
    kv_usage: float = 0.0


@dataclass(frozen=True)
class PrefilledFirst:
    """What P computed for a prefilled request's first position: the first token, its logprob and
    the logprob extras the request asked for (api, #17)."""

    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None = None
    prompt_logprobs: list[PromptLogprob] | None = None


class EngineWorker:
    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        # Fixed at start-up, so safe to read from the loop without a hop to the engine thread.
        self.block_size: int = engine.config.block_size
        self.num_kv_blocks: int = engine.block_manager.num_blocks
        self.eos_token_ids: frozenset[int] = engine.stop_checker.eos_token_ids
        self._loop = loop
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}  # loop only
        self._in_engine: set[str] = set()  # engine thread only: ids added or admitted, not finished
        self._running = False
        self._thread: threading.Thread | None = None
        self.load = self._snapshot()
        self.num_step_errors = 0
        # Set before start(): the node's request-phase metrics (called on the engine thread).
        self.request_stats: RequestStats | None = None
        # Set before start(): called on the loop once the engine cannot serve any more.
        self.on_fatal: Callable[[str], None] | None = None
        self.fatal_reason: str | None = None
        runner = engine.runner
        if isinstance(runner, TPModelRunner):
            runner.on_rank_lost = self._rank_lost

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        self._commands.put(lambda: None)  # wake the thread
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- asyncio-facing API -------------------------------------------------------------------

    def submit(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams, *, prefill_only: bool = False
    ) -> asyncio.Queue[RequestOutput]:
        """Queue a request; its outputs (ending with one whose ``finished`` is True) arrive on the
        returned queue. Input errors arrive as a final output with ``error`` set; an id whose
        previous request has not delivered its last output yet raises EngineError."""
        out_q = self.attach(req_id)

        def add() -> None:
            if self.fatal_reason is not None:
                self._deliver(
                    [RequestOutput(req_id=req_id, finish_reason=FinishReason.ABORT, error=self.fatal_reason)]
                )
                return
            try:
                self.engine.add_request(req_id, prompt_token_ids, params, prefill_only=prefill_only)
                self._in_engine.add(req_id)
                if self.request_stats is not None:
                    self.request_stats.added(self.engine, req_id, prefill_only=prefill_only)
            except EngineError as exc:
                self._deliver(
                    [RequestOutput(req_id=req_id, finish_reason=FinishReason.ABORT, error=str(exc))]
                )

        self._commands.put(add)
        return out_q

    def attach(self, req_id: str) -> asyncio.Queue[RequestOutput]:
        """An output queue for a request that enters the engine through ``call`` (a prefilled one).
        Loop only. Raises EngineError while ``req_id`` still has a queue (its last output not routed)."""
        if req_id in self._queues:
            raise EngineError("a request with this id is still running on this node", req_id=req_id)
        out_q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[req_id] = out_q
        return out_q

    def is_attached(self, req_id: str) -> bool:
        """A request with this id still has an output queue here (loop only)."""
        return req_id in self._queues

    def abort(self, req_id: str) -> None:
        """Cancel at any stage; the request's queue gets a final ABORT output. Unknown ids are ignored."""

        def cancel() -> None:
            try:
                self.engine.abort(req_id)
            except UnknownRequestError:
                self._deliver([RequestOutput(req_id=req_id, finish_reason=FinishReason.ABORT)])

        self._commands.put(cancel)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between steps; re-raises its exception here."""
        future: asyncio.Future[Any] = self._loop.create_future()

        def run() -> None:
            try:
                result = fn(self.engine)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
                self._loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                self._loop.call_soon_threadsafe(_set_result, future, result)

        self._commands.put(run)
        result: T = await future
        return result

    # -- the disaggregation calls (each one hop to the engine thread) --------------------------

    async def validate_prompt(self, req_id: str, prompt_token_ids: list[int]) -> None:
        await self.call(lambda e: e.validate_prompt(prompt_token_ids, req_id=req_id))

    async def cached_prefix_tokens(self, prompt_token_ids: list[int]) -> int:
        """Leading prompt tokens whose KV this node's prefix cache holds now (a lookup, no reference)."""
        return int(await self.call(lambda e: e.block_manager.cached_prefix(prompt_token_ids).num_tokens))

    async def reserve(self, req_id: str, num_tokens: int) -> list[int]:
        """Reserve KV blocks for incoming KV; raises OutOfBlocksError when full."""
        return await self.call(lambda e: e.reserve(req_id, num_tokens))

    async def reserve_reusing(
        self, req_id: str, prompt_token_ids: list[int], num_tokens: int
    ) -> tuple[list[int], int]:
        """``reserve`` whose first blocks are the prompt's cached prefix: (block ids, cached count)."""
        return await self.call(lambda e: e.reserve_reusing(req_id, prompt_token_ids, num_tokens))

    async def release_reservation(self, req_id: str) -> None:
        """Free a reservation; an unknown one (already released or aborted) is a no-op."""

        def release(engine: LLMEngine) -> None:
            if engine.block_manager.has_reservation(req_id):
                engine.release_reservation(req_id)

        await self.call(release)

    async def admit_prefilled(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams, first: PrefilledFirst
    ) -> asyncio.Queue[RequestOutput]:
        """Admit a request whose KV landed in its reservation; its outputs (the first token
        first) arrive on the returned queue."""
        out_q = self.attach(req_id)

        def admit(engine: LLMEngine) -> None:
            output = engine.add_prefilled_request(
                req_id,
                prompt_token_ids,
                params,
                first.token_id,
                first.logprob,
                first.top_logprobs,
                first.prompt_logprobs,
            )
            self._in_engine.add(req_id)
            self._deliver([output])

        try:
            await self.call(admit)
        except BaseException:
            self._queues.pop(req_id, None)
            raise
        return out_q

    async def release_prefill(self, req_id: str) -> None:
        """P: free the blocks of a PREFILL_DONE request (D confirmed its KV landed)."""

        def release(engine: LLMEngine) -> None:
            try:
                engine.release_prefill(req_id)
            except UnknownRequestError:
                pass  # aborted meanwhile (a cancel): the abort freed its blocks

        await self.call(release)

    # -- live migration (each one hop to the engine thread; splitwise/engine/migration.py) -----

    async def migration_blocks(self, req_id: str) -> migration.BlockView | None:
        """Source: the block table of a decoding request (None: not decoding now)."""
        return await self.call(lambda e: migration.blocks_of(e, req_id))

    async def running_blocks(self) -> list[tuple[str, int]]:
        """(req_id, blocks held) of every running request, in admission order."""
        return await self.call(migration.running_blocks)

    async def pause_for_migration(self, req_id: str) -> migration.RunningState | None:
        """Source: stop a decoding request between two steps, blocks kept (None: not decoding).
        Every output of the steps before it is already on its way to the request's queue."""
        return await self.call(lambda e: migration.pause(e, req_id))

    async def resume_migration(self, req_id: str) -> None:
        """Source: the migration failed; the paused request decodes here again."""
        await self.call(lambda e: migration.resume(e, req_id))

    async def drop_migrated(self, req_id: str) -> None:
        """Source: the target runs the request now; free its blocks. Its queue gets a final ABORT
        output (the runtime knows it migrated and publishes no terminal for it)."""

        def drop(engine: LLMEngine) -> None:
            migration.drop(engine, req_id)
            self._deliver([RequestOutput(req_id=req_id, finish_reason=FinishReason.ABORT)])

        await self.call(drop)

    async def admit_migrated(self, state: migration.RunningState) -> asyncio.Queue[RequestOutput]:
        """Target: admit a migrated request whose KV landed in its reservation."""
        out_q = self.attach(state.req_id)

        def admit(engine: LLMEngine) -> None:
            migration.admit(engine, state)
            self._in_engine.add(state.req_id)

        try:
            await self.call(admit)
        except BaseException:
            self._queues.pop(state.req_id, None)
            raise
        return out_q

    def set_layer_callback(self, callback: LayerCallback | None) -> None:
        """Set before ``start``: the engine thread calls it after each layer's KV is written."""
        self.engine.set_layer_callback(callback)

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while self._running:
            stepping = self.fatal_reason is None and self.engine.has_unfinished()
            self._drain_commands(block=not stepping)
            if self.fatal_reason is not None or not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - the engine thread's error boundary
                self.num_step_errors += 1
                log.exception("engine step failed; failing in-flight requests", error=str(exc))
                if getattr(exc, "fatal", False):
                    self._fatal(str(exc))
                    continue
                outputs = self._fail_all(f"internal engine error: {exc}")
            if self.request_stats is not None:
                self.request_stats.stepped(self.engine)
            self._deliver(outputs)
            self.load = self._snapshot()

    def _rank_lost(self, reason: str) -> None:
        """From the TP runner's monitor thread: fail everything on the engine thread."""
        self._commands.put(lambda: self._fatal(reason))

    def _fatal(self, reason: str) -> None:
        """On the engine thread: no more steps; every request held fails; the owner is told."""
        if self.fatal_reason is not None:
            return
        self.fatal_reason = f"engine lost: {reason}"
        log.error("engine cannot serve any more", reason=reason)
        self._deliver(self._fail_all(self.fatal_reason))
        if self.on_fatal is not None:
            self._loop.call_soon_threadsafe(self.on_fatal, self.fatal_reason)

    def _drain_commands(self, *, block: bool) -> None:
        try:
            command = self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            command()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
        self.load = self._snapshot()

    def _fail_all(self, message: str) -> list[RequestOutput]:
        failed = []
        for req_id in sorted(self._in_engine):
            try:
                self.engine.abort(req_id)
            except EngineError:
                pass
            failed.append(RequestOutput(req_id=req_id, finish_reason=FinishReason.ABORT, error=message))
        return failed

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Engine thread: post this batch of outputs to the loop (one event), which routes them."""
        if self.request_stats is not None:
            self.request_stats.delivered(outputs)
        for out in outputs:
            if out.finished:
                self._in_engine.discard(out.req_id)
        if outputs:
            self._loop.call_soon_threadsafe(self._route, outputs)

    def _route(self, outputs: list[RequestOutput]) -> None:
        """Loop: hand each output to its request's queue; a request's last output removes it."""
        for out in outputs:
            out_q = self._queues.get(out.req_id)
            if out_q is None:
                continue  # nobody waits for it (an abort of an unknown or finished request)
            if out.finished:
                del self._queues[out.req_id]
            out_q.put_nowait(out)

    def _snapshot(self) -> LoadSnapshot:
        engine = self.engine
        bm = engine.block_manager
        return LoadSnapshot(
            queued_prefill_tokens=engine.num_queued_prefill_tokens(),
            running_requests=engine.scheduler.num_running,
            waiting_requests=engine.scheduler.num_waiting,
            free_kv_blocks=bm.num_free_blocks,
            total_kv_blocks=bm.num_blocks,
            kv_usage=bm.usage,
        )


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
