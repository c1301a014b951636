"""Prefill side of a disaggregated request (P; see docs/architecture.md steps 5-6).

    PrefillTask from D -> connect the transport to D (once per peer) -> prefill-only request
    -> per layer: ship the blocks this chunk wrote (engine thread, layer callback)
    -> finish notice -> wait until D confirms every write landed -> free P's blocks
    -> PrefillResult(first token, logprob) to D -> release the scheduler's prefill booking

Each request has one ``PrefillRecord`` (state ``handoff_state.PrefillState``), owned by the event
loop and changed only through ``Transitions.move``. The engine thread sees a request only through
the shipping table: an immutable mapping the loop replaces as a whole, so the layer callback reads
it without waiting. ``_ship_lock`` guards nothing that can wait: it makes "check the table, queue
the write" atomic against a cancel's removal, so once ``cancel`` returns no new write is issued;
the initiator's ``forget`` (which may wait for in-flight writes) runs after, outside it.

Which blocks a chunk ships (positions ``start .. end-1`` of the sequence, block size ``bs``)::

    first chunk of an admission (start == num_cached_tokens): blocks 0 .. (end-1)//bs
        (prefix-cache hits were not computed now, but D needs them too)
    later chunks:                                            blocks start//bs .. (end-1)//bs
        (a block a previous chunk left partial is sent again, complete)
    decode-side reuse (task.skip_blocks = k): blocks below k are never shipped (D holds them in
        its prefix cache); block i >= k goes to dst_block_ids[i - k]

P still computes the whole prompt's KV (attention over the prefix needs it): from its own prefix
cache where it holds the prefix, else by recomputing it. That is the simplest correct choice: D
sending its prefix KV to P would cost the transfer the reuse saves, and computing it is what P does
for any prompt.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, field
from typing import Any, Protocol

from scheduler.errors import SchedulerError
from splitwise.counters import Counters
from splitwise.engine.errors import EngineError, InvalidRequestError
from splitwise.engine.model_runner import LayerCallback, ScheduledChunk
from splitwise.engine.outputs import RequestOutput
from splitwise.engine.prompt_logprobs import to_wire as prompt_logprobs_to_wire
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import FinishReason
from splitwise.errors import SplitwiseError
from splitwise.instance.handoff_state import PREFILL_MOVES, PrefillState, Record, Transitions
from splitwise.instance.offload import Offload, run_in_executor
from splitwise.instance.pd_channel import Channel, Connection
from splitwise.instance.transfer_metrics import TransferMetrics
from splitwise.logging import bind_request, get_logger
from splitwise.transfer.base import ReadyToken, TransferStatus, TransportInitiator
from splitwise.transfer.messages import (
    CallMessage,
    CancelRequest,
    PrefillFailed,
    PrefillResult,
    PrefillTask,
    request_of,
)

log = get_logger(__name__)
S = PrefillState
ReleaseBooking = Callable[[str], Awaitable[None]]  # the scheduler's release_prefill


class PrefillWorker(Protocol):
    """What the prefill flow needs of the engine worker (``EngineWorker``; a fake in tests)."""

    block_size: int

    def submit(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams, *, prefill_only: bool = False
    ) -> asyncio.Queue[RequestOutput]: ...
    def abort(self, req_id: str) -> None: ...
    async def release_prefill(self, req_id: str) -> None: ...
    def set_layer_callback(self, callback: LayerCallback | None) -> None: ...


class _Stopped(SplitwiseError):
    """The record was cancelled while the driver waited: end quietly (D does not wait for us)."""


@dataclass(eq=False)
class _Shipment:
    """The engine thread's view of one remote request. Never replaced in place: only the engine
    thread writes ``deferred`` and ``first_write_s`` (the loop reads them once shipping stopped)."""

    peer_id: str
    initiator: TransportInitiator
    dst_block_ids: tuple[int, ...]
    skip_blocks: int = 0  # the prompt's leading blocks D already holds (decode-side reuse)
    # Unpipelined mode only: (layer, src, dst, ready) writes held back until the prefill finished.
    deferred: list[tuple[int, list[int], list[int], ReadyToken]] = field(default_factory=list)
    first_write_s: float | None = None  # kv_transfer_latency starts here, not at the task's arrival


@dataclass
class PrefillRecord(Record[PrefillState]):
    task: PrefillTask | None = None
    conn: Connection | None = None


class PrefillFlow:
    def __init__(
        self,
        worker: PrefillWorker,
        channel: Channel,
        initiators: dict[str, TransportInitiator],
        counters: Counters,
        *,
        release_booking: ReleaseBooking | None = None,
        transfer_timeout_s: float = 60.0,
        transfer_metrics: TransferMetrics | None = None,
        pipelined: bool = True,
        offload: Offload = run_in_executor,
    ) -> None:
        self.worker = worker
        self.channel = channel
        self.initiators = initiators
        self.counters = counters
        self.release_booking = release_booking
        self.transfer_timeout_s = transfer_timeout_s
        self.transfer_metrics = transfer_metrics
        self.pipelined = pipelined  # False: ship every layer after the prefill (benchmark baseline)
        self.block_size = worker.block_size
        self.transitions = Transitions("prefill", PREFILL_MOVES, counters)
        self.records: dict[str, PrefillRecord] = {}
        self._offload = offload
        self._ship_lock = threading.Lock()
        self._shipping: Mapping[str, _Shipment] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # req_id -> a forget still running off the loop: a cancel's Ack waits for it (#11 fence).
        self._fences: dict[str, asyncio.Future[Any]] = {}
        worker.set_layer_callback(self.on_layer)

    # -- control messages (event loop, before the Ack) ----------------------------------------

    def handle(self, conn: Connection, message: CallMessage) -> Awaitable[None] | None:
        """Refuse what we cannot serve (raise: D gets an ErrorReply and falls back at once);
        start a task; stop a cancelled request and return its fence: the channel sends D's Ack
        only once it resolved, so "cancel confirmed" means nothing more of it can land (#11)."""
        if isinstance(message, CancelRequest):
            return self.cancel(message.req_id, message.reason)
        if isinstance(message, PrefillTask):
            req_id = message.req_id
            if message.protocol not in self.initiators:
                raise InvalidRequestError(
                    f"this prefill node offers no {message.protocol!r} transport", req_id=req_id
                )
            if req_id in self.records:
                raise InvalidRequestError("request is already being prefilled here", req_id=req_id)
            rec = PrefillRecord(req_id, S.CONNECTING, peer_id=conn.peer_id, task=message, conn=conn)
            self.records[req_id] = rec
            task = asyncio.get_running_loop().create_task(self._serve(rec), name=f"prefill-{req_id}")
            self._tasks[req_id] = task
            task.add_done_callback(lambda _task: self._tasks.pop(req_id, None) and None)
        return None

    def cancel(self, req_id: str, reason: str = "cancelled") -> Awaitable[None] | None:
        """D gave up, or the client went away: stop shipping and drop the request. Returns the
        fence (None: nothing can be in flight): it resolves once the initiator's ``forget``
        returned, i.e. no write of the request can land on D any more."""
        rec = self.records.get(req_id)
        if rec is not None and self.transitions.moves[rec.state]:
            shipment = self._stop_shipping(req_id)
            self.transitions.move(rec, S.CANCELLED, "cancel", reason)
            self.worker.abort(req_id)
            if shipment is not None:
                self._forget_later(shipment.initiator, req_id)
        fence = self._fences.get(req_id)
        return None if fence is None else asyncio.shield(fence)

    async def on_peer_lost(self, peer_id: str) -> None:
        """#11: the control connection to decode node ``peer_id`` dropped: stop every transport
        write to it (one-sided writes would otherwise go on landing in blocks D may reuse).
        ``abort_peer`` waits for in-flight writes, so it runs off the loop."""
        for initiator in list(self.initiators.values()):
            await self._offload(functools.partial(initiator.abort_peer, peer_id, "control connection lost"))

    # -- one request --------------------------------------------------------------------------

    async def _serve(self, rec: PrefillRecord) -> None:
        assert rec.task is not None and rec.conn is not None
        task, req_id = rec.task, rec.req_id
        with bind_request(req_id, peer=rec.peer_id):
            reply: CallMessage | None = None
            try:
                log.info("prefill request received", prompt_tokens=len(task.prompt_token_ids))
                first = await self._prefill_and_ship(rec)
                reply = _result(req_id, first)
                log.info("prefill shipped", first_token_id=first.new_token_ids[0])
                self.counters.inc("prefills_shipped")
            except _Stopped:
                log.info("prefill for a decode node cancelled", reason=rec.reason)
            except (SplitwiseError, asyncio.TimeoutError) as exc:
                if self.transitions.can_move(rec, S.FAILED):
                    self.transitions.move(rec, S.FAILED, "failed", str(exc))
                self.counters.inc("prefill_failures")
                if self.transfer_metrics is not None:
                    self.transfer_metrics.failed(task.protocol, type(exc).__name__)
                log.warning("prefill for a decode node failed", error=str(exc))
                reason = str(exc) or type(exc).__name__
                reply = PrefillFailed(call_id=0, req_id=req_id, reason=reason, retryable=True)
            finally:
                self._stop_shipping(req_id)
                if self.records.get(req_id) is rec:
                    del self.records[req_id]
            if reply is not None:
                try:
                    await self.channel.call(rec.conn, reply)
                except SplitwiseError as exc:
                    log.warning("could not answer the decode node", error=str(exc))
            if self.release_booking is not None:
                try:
                    await self.release_booking(request_of(req_id))  # req_id: the hand-off id
                except SchedulerError as exc:
                    log.warning("could not release the prefill booking", error=str(exc))

    async def _prefill_and_ship(self, rec: PrefillRecord) -> RequestOutput:
        assert rec.task is not None
        task, req_id = rec.task, rec.req_id
        initiator = self.initiators[task.protocol]
        await self._offload(lambda: initiator.connect(rec.peer_id, task.endpoint))
        self._check_live(rec)
        self.transitions.move(rec, S.PREFILLING, "connected")
        shipment = _Shipment(rec.peer_id, initiator, tuple(task.dst_block_ids), task.skip_blocks)
        self._start_shipping(req_id, shipment)
        outputs = self.worker.submit(
            req_id, list(task.prompt_token_ids), task.sampling_params, prefill_only=True
        )
        while not (out := await outputs.get()).finished:
            pass
        self._check_live(rec)
        if out.finish_reason is not FinishReason.PREFILL_DONE:
            self._forget_later(initiator, req_id)
            raise EngineError(out.error or f"prefill ended with {out.finish_reason}", req_id=req_id)
        self.transitions.move(rec, S.DRAINING, "computed")
        prefill_done_s = time.monotonic()
        try:
            self._ship_deferred(req_id)
            initiator.finish(rec.peer_id, req_id)
            status: TransferStatus = await self._offload(
                lambda: initiator.wait(req_id, self.transfer_timeout_s)
            )
        finally:
            self._stop_shipping(req_id)
            await self._offload(lambda: initiator.forget(req_id))
            await self.worker.release_prefill(req_id)
        self._check_live(rec)
        if not status.is_done:
            raise EngineError(
                f"KV transfer to {rec.peer_id} {status.state.value}: {status.reason or 'timed out'}",
                req_id=req_id,
            )
        self.transitions.move(rec, S.SHIPPED, "landed")
        if self.transfer_metrics is not None:
            landed_s = time.monotonic()
            first_write_s = shipment.first_write_s
            self.transfer_metrics.shipped(
                task.protocol,
                len(task.dst_block_ids),
                transfer_s=None if first_write_s is None else landed_s - first_write_s,
                exposed_s=landed_s - prefill_done_s,
            )
        return out

    def _check_live(self, rec: PrefillRecord) -> None:
        if rec.is_in(S.CANCELLED):
            raise _Stopped(rec.reason)

    # -- the shipping table (loop writes, engine thread reads) ---------------------------------

    def _start_shipping(self, req_id: str, shipment: _Shipment) -> None:
        with self._ship_lock:
            self._shipping = {**self._shipping, req_id: shipment}

    def _stop_shipping(self, req_id: str) -> _Shipment | None:
        with self._ship_lock:
            shipment = self._shipping.get(req_id)
            if shipment is not None:
                self._shipping = {k: v for k, v in self._shipping.items() if k != req_id}
        return shipment

    def _forget_later(self, initiator: TransportInitiator, req_id: str) -> None:
        """``forget`` may wait for in-flight writes: never on the loop, never under a lock. Kept
        in ``_fences`` until it returned, so a cancel's Ack can wait for it."""
        fence = asyncio.ensure_future(self._offload(lambda: initiator.forget(req_id)))
        self._fences[req_id] = fence

        def done(task: asyncio.Future[Any]) -> None:
            if self._fences.get(req_id) is task:
                del self._fences[req_id]
            if not task.cancelled() and task.exception() is not None:
                log.warning("forget failed", req_id=req_id, error=str(task.exception()))

        fence.add_done_callback(done)

    def _ship_deferred(self, req_id: str) -> None:
        """Unpipelined mode: issue the writes ``on_layer`` held back (P still holds the blocks)."""
        shipment = self._shipping.get(req_id)
        if shipment is None or not shipment.deferred:
            return
        shipment.first_write_s = time.monotonic()
        for layer, src, dst, ready in shipment.deferred:
            shipment.initiator.write_layer(shipment.peer_id, req_id, layer, src, dst, ready)
        shipment.deferred.clear()

    # -- engine thread ------------------------------------------------------------------------

    def on_layer(self, layer: int, chunks: SequenceOf[ScheduledChunk], ready: ReadyToken) -> None:
        """Layer ``layer``'s KV of this batch is issued: ship the blocks of remote requests. The
        transport reads them only once ``ready`` completed (#11: CUDA event of the compute stream)."""
        shipping = self._shipping  # one read of the current table: no lock needed to look up
        for chunk in chunks:
            seq = chunk.seq
            shipment = shipping.get(seq.req_id)
            if shipment is None:
                continue
            start = seq.num_computed_tokens
            end = start + chunk.num_new_tokens
            skip = shipment.skip_blocks
            first_block = 0 if start == seq.num_cached_tokens else start // self.block_size
            first_block = max(first_block, skip)
            last_block = min((end - 1) // self.block_size, skip + len(shipment.dst_block_ids) - 1)
            if last_block < first_block:
                continue
            src = list(seq.block_table[first_block : last_block + 1])
            dst = list(shipment.dst_block_ids[first_block - skip : last_block - skip + 1])
            if not self.pipelined:
                shipment.deferred.append((layer, src, dst, ready))
                continue
            with self._ship_lock:  # write_layer only queues (non-blocking by contract)
                if self._shipping.get(seq.req_id) is not shipment:
                    continue  # cancelled since this step began
                try:
                    if shipment.first_write_s is None:
                        shipment.first_write_s = time.monotonic()
                    shipment.initiator.write_layer(shipment.peer_id, seq.req_id, layer, src, dst, ready)
                except SplitwiseError as exc:
                    # Shows up as FAILED in poll/wait too; stop shipping this request.
                    log.warning("write_layer refused", req_id=seq.req_id, layer=layer, error=str(exc))
                    self._shipping = {k: v for k, v in self._shipping.items() if k != seq.req_id}


def _result(req_id: str, first: RequestOutput) -> PrefillResult:
    """D's PrefillResult: the first token with its logprob, top alternatives and prompt logprobs."""
    prompt_lps, prompt_top_ids, prompt_top_lps = prompt_logprobs_to_wire(first.prompt_logprobs)
    tops = first.new_top_logprobs[0] if first.new_top_logprobs else []
    return PrefillResult(
        call_id=0,
        req_id=req_id,
        first_token_id=first.new_token_ids[0],
        logprob=first.new_logprobs[0],
        top_token_ids=[t for t, _ in tops],
        top_logprobs=[lp for _, lp in tops],
        prompt_logprobs=prompt_lps,
        prompt_top_token_ids=prompt_top_ids,
        prompt_top_logprobs=prompt_top_lps,
    )
