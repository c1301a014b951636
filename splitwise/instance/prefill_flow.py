"""Prefill side of a disaggregated request (P; see docs/architecture.md steps 5-6).

    PrefillTask from D -> connect the transport to D (once per peer) -> prefill-only request
    -> per layer: ship the blocks this chunk wrote (engine thread, layer callback)
    -> finish notice -> wait until D confirms every write landed -> free P's blocks
    -> PrefillResult(first token, logprob) to D -> release the scheduler's prefill booking

Which blocks a chunk ships (positions ``start .. end-1`` of the sequence, block size ``bs``)::

    first chunk of an admission (start == num_cached_tokens): blocks 0 .. (end-1)//bs
        (prefix-cache hits were not computed now, but D needs them too)
    later chunks:                                            blocks start//bs .. (end-1)//bs
        (a block a previous chunk left partial is sent again, complete)
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Sequence as SequenceOf
from typing import Any

from scheduler.errors import SchedulerError
from splitwise.engine.errors import EngineError, InvalidRequestError
from splitwise.engine.model_runner import ScheduledChunk
from splitwise.engine.outputs import RequestOutput
from splitwise.engine.prompt_logprobs import to_wire as prompt_logprobs_to_wire
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import FinishReason
from splitwise.errors import SplitwiseError
from splitwise.instance.engine_worker import EngineWorker
from splitwise.instance.pd_channel import PDChannel
from splitwise.instance.transfer_metrics import TransferMetrics
from splitwise.logging import bind_request, get_logger
from splitwise.transfer.base import ReadyToken, TransferCounters, TransportInitiator
from splitwise.transfer.control_connection import ControlConnection
from splitwise.transfer.messages import CallMessage, CancelRequest, PrefillFailed, PrefillResult, PrefillTask

log = get_logger(__name__)


@dataclasses.dataclass
class _Remote:
    peer_id: str
    initiator: TransportInitiator
    dst_block_ids: list[int]
    cancelled: bool = False
    # Unpipelined mode only: (layer, src, dst) writes held back until the prefill finished.
    deferred: list[tuple[int, list[int], list[int], ReadyToken]] = dataclasses.field(default_factory=list)
    first_write_s: float | None = None  # kv_transfer_latency starts here, not at the task's arrival


class PrefillFlow:
    def __init__(
        self,
        worker: EngineWorker,
        channel: PDChannel,
        initiators: dict[str, TransportInitiator],
        counters: TransferCounters,
        *,
        release_booking: Any = None,  # async (req_id) -> None: the scheduler's release_prefill
        transfer_timeout_s: float = 60.0,
        transfer_metrics: TransferMetrics | None = None,
        layer_delay_s: float = 0.0,
        pipelined: bool = True,
    ) -> None:
        self.worker = worker
        self.channel = channel
        self.initiators = initiators
        self.counters = counters
        self.release_booking = release_booking
        self.transfer_timeout_s = transfer_timeout_s
        self.transfer_metrics = transfer_metrics
        self.layer_delay_s = layer_delay_s  # debug: slow compute down (failure tests)
        self.pipelined = pipelined  # False: ship every layer after the prefill (benchmark baseline)
        self.block_size = worker.engine.config.block_size
        self._lock = threading.Lock()
        self._remote: dict[str, _Remote] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        worker.engine.set_layer_callback(self.on_layer)

    # -- control messages ---------------------------------------------------------------------

    def validate(self, conn: ControlConnection, message: CallMessage) -> None:
        """Reader thread, before the Ack: refuse what we cannot serve, so D falls back at once; stop
        shipping a cancelled request, so D's "cancel confirmed" means no new write is issued."""
        if isinstance(message, CancelRequest):
            self.cancel(message.req_id)
        elif isinstance(message, PrefillTask):
            if message.protocol not in self.initiators:
                raise InvalidRequestError(
                    f"this prefill node offers no {message.protocol!r} transport", req_id=message.req_id
                )
            with self._lock:
                if message.req_id in self._remote:
                    raise InvalidRequestError(
                        "request is already being prefilled here", req_id=message.req_id
                    )

    def on_message(self, conn: ControlConnection, message: CallMessage) -> None:
        if isinstance(message, PrefillTask):
            task = asyncio.get_running_loop().create_task(
                self._serve(conn, message), name=f"prefill-{message.req_id}"
            )
            self._tasks[message.req_id] = task
            req_id = message.req_id
            task.add_done_callback(lambda _task: self._tasks.pop(req_id, None) and None)

    async def on_peer_lost(self, peer_id: str) -> None:
        """#11: the control connection to decode node ``peer_id`` dropped: stop every transport
        write to it (one-sided writes would otherwise go on landing in blocks D may reuse)."""
        loop = asyncio.get_running_loop()
        for initiator in self.initiators.values():
            await loop.run_in_executor(None, initiator.abort_peer, peer_id, "control connection lost")

    def cancel(self, req_id: str) -> None:
        """D gave up, or the client went away: stop shipping and drop the request."""
        with self._lock:
            remote = self._remote.get(req_id)
            if remote is not None:
                remote.cancelled = True
                remote.initiator.forget(req_id)
        if remote is not None:
            self.worker.abort(req_id)

    # -- one request --------------------------------------------------------------------------

    async def _serve(self, conn: ControlConnection, task: PrefillTask) -> None:
        req_id = task.req_id
        with bind_request(req_id, peer=conn.peer_id):
            try:
                log.info("prefill request received", prompt_tokens=len(task.prompt_token_ids))
                first = await self._prefill_and_ship(conn, task)
                prompt_lps, prompt_top_ids, prompt_top_lps = prompt_logprobs_to_wire(first.prompt_logprobs)
                reply: CallMessage = PrefillResult(
                    call_id=0,
                    req_id=req_id,
                    first_token_id=first.new_token_ids[0],
                    logprob=first.new_logprobs[0],
                    top_token_ids=[t for t, _ in first.new_top_logprobs[0]],
                    top_logprobs=[lp for _, lp in first.new_top_logprobs[0]],
                    prompt_logprobs=prompt_lps,
                    prompt_top_token_ids=prompt_top_ids,
                    prompt_top_logprobs=prompt_top_lps,
                )
                log.info("prefill shipped", first_token_id=first.new_token_ids[0])
                self.counters.incr("prefills_shipped")
            except (SplitwiseError, asyncio.TimeoutError) as exc:
                self.counters.incr("prefill_failures")
                if self.transfer_metrics is not None:
                    self.transfer_metrics.failed(task.protocol, type(exc).__name__)
                log.warning("prefill for a decode node failed", error=str(exc))
                reply = PrefillFailed(
                    call_id=0, req_id=req_id, reason=str(exc) or type(exc).__name__, retryable=True
                )
            finally:
                with self._lock:
                    self._remote.pop(req_id, None)
            try:
                await self.channel.call(conn, reply)
            except SplitwiseError as exc:
                log.warning("could not answer the decode node", error=str(exc))
            if self.release_booking is not None:
                try:
                    await self.release_booking(req_id)
                except SchedulerError as exc:
                    log.warning("could not release the prefill booking", error=str(exc))

    async def _prefill_and_ship(self, conn: ControlConnection, task: PrefillTask) -> RequestOutput:
        req_id = task.req_id
        initiator = self.initiators[task.protocol]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: initiator.connect(conn.peer_id, task.endpoint))
        params = SamplingParams(**_params_from_wire(task.sampling_params))
        remote = _Remote(conn.peer_id, initiator, list(task.dst_block_ids))
        with self._lock:
            self._remote[req_id] = remote
        outputs = self.worker.submit(req_id, list(task.prompt_token_ids), params, prefill_only=True)
        while True:
            out = await outputs.get()
            if out.finished:
                break
        if out.finish_reason is not FinishReason.PREFILL_DONE:
            initiator.forget(req_id)
            raise EngineError(out.error or f"prefill ended with {out.finish_reason}", req_id=req_id)
        prefill_done_s = time.monotonic()
        try:
            self._ship_deferred(req_id)
            initiator.finish(conn.peer_id, req_id)
            status = await loop.run_in_executor(None, lambda: initiator.wait(req_id, self.transfer_timeout_s))
        finally:
            initiator.forget(req_id)
            await self.worker.call(lambda e: e.release_prefill(req_id))
        if not status.is_done:
            raise EngineError(
                f"KV transfer to {conn.peer_id} {status.state.value}: {status.reason or 'timed out'}",
                req_id=req_id,
            )
        if self.transfer_metrics is not None:
            landed_s = time.monotonic()
            transfer_s = None if remote.first_write_s is None else landed_s - remote.first_write_s
            self.transfer_metrics.shipped(
                task.protocol,
                len(task.dst_block_ids),
                transfer_s=transfer_s,
                exposed_s=landed_s - prefill_done_s,
            )
        return out

    def _ship_deferred(self, req_id: str) -> None:
        """Unpipelined mode: issue the writes ``on_layer`` held back (P still holds the blocks)."""
        with self._lock:
            remote = self._remote.get(req_id)
        if remote is None or not remote.deferred:
            return
        remote.first_write_s = time.monotonic()
        for layer, src, dst, ready in remote.deferred:
            remote.initiator.write_layer(remote.peer_id, req_id, layer, src, dst, ready)
        remote.deferred.clear()

    # -- engine thread ------------------------------------------------------------------------

    def on_layer(self, layer: int, chunks: SequenceOf[ScheduledChunk], ready: ReadyToken) -> None:
        """Layer ``layer``'s KV of this batch is issued: ship the blocks of remote requests. The
        transport reads them only once ``ready`` completed (#11: CUDA event of the compute stream)."""
        shipped = False
        for chunk in chunks:
            seq = chunk.seq
            with self._lock:
                remote = self._remote.get(seq.req_id)
            if remote is None or remote.cancelled:
                continue
            start = seq.num_computed_tokens
            end = start + chunk.num_new_tokens
            first_block = 0 if start == seq.num_cached_tokens else start // self.block_size
            last_block = min((end - 1) // self.block_size, len(remote.dst_block_ids) - 1)
            if last_block < first_block:
                continue
            src = seq.block_table[first_block : last_block + 1]
            dst = remote.dst_block_ids[first_block : last_block + 1]
            if not self.pipelined:
                remote.deferred.append((layer, list(src), list(dst), ready))
                continue
            try:
                if remote.first_write_s is None:
                    remote.first_write_s = time.monotonic()
                remote.initiator.write_layer(remote.peer_id, seq.req_id, layer, src, dst, ready)
                shipped = True
            except SplitwiseError as exc:
                # Shows up as FAILED in poll/wait too; stop shipping this request.
                log.warning("write_layer refused", req_id=seq.req_id, layer=layer, error=str(exc))
                remote.cancelled = True
        if shipped and self.layer_delay_s:
            # Debug only (--debug-prefill-layer-delay-ms): after the write was queued, so a test
            # that sees the first bytes land knows the request is mid-transfer for a while.
            time.sleep(self.layer_delay_s)


def _params_from_wire(raw: dict[str, Any]) -> dict[str, Any]:
    params = dict(raw)
    for key in ("stop", "stop_token_ids"):
        if params.get(key) is not None:
            params[key] = tuple(params[key])
    return params
