"""Decode side of a disaggregated request (D drives; see docs/architecture.md steps 4-7).

    reserve blocks (bounded wait) -> target.expect -> PrefillTask to P -> PrefillResult
    -> every layer landed? -> admit with the first token -> decode (NodeRuntime streams it)

Each request has one ``DecodeRecord`` whose state (``handoff_state.DecodeState``) changes only
through ``Transitions.move``; the events that end the remote prefill (P's result, P's failure, a
lost peer, the transfer timeout, a cancel) are handled on the event loop as they arrive, each by
one transition. Failure with ``--pd-fallback local``: the request is prefilled here instead, logged
and counted; with ``fail`` it fails with an explicit error. The reservation of a request that left
PREFILLING early is released only once P can no longer write into it (#11 fencing): P
acknowledged the cancel, or, without an acknowledgement, the target revoked P's access; if even
that cannot be confirmed the blocks are quarantined. One-sided writes (ipc, rdma) would otherwise
land in blocks another request already uses.
"""

from __future__ import annotations

import asyncio
import functools

from scheduler.clock import SYSTEM_CLOCK, Clock
from scheduler.messages import WorkItem
from splitwise import codes
from splitwise.counters import Counters
from splitwise.engine.errors import EngineError, OutOfBlocksError
from splitwise.engine.outputs import RequestOutput
from splitwise.engine.prompt_logprobs import from_wire as prompt_logprobs_from_wire
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import FinishReason
from splitwise.errors import SplitwiseError
from splitwise.instance.config import InstanceConfig
from splitwise.instance.decode_record import (
    DecodeCapacityError,
    DecodeRecord,
    DecodeWorker,
    PrefillUnavailable,
    PromptTooLargeError,
)
from splitwise.instance.engine_worker import PrefilledFirst
from splitwise.instance.handoff_state import (
    DECODE_MOVES,
    DECODE_OWNS_CLEANUP,
    DecodeState,
    Transitions,
)
from splitwise.instance.host_identity import advertised
from splitwise.instance.offload import Offload, run_in_executor
from splitwise.instance.pd_channel import Channel, Connection
from splitwise.instance.transfer_metrics import TransferMetrics
from splitwise.logging import get_logger
from splitwise.transfer.base import TransportTarget
from splitwise.transfer.messages import (
    CallMessage,
    CancelRequest,
    PrefillFailed,
    PrefillResult,
    PrefillTask,
    handoff_id,
)

log = get_logger(__name__)

__all__ = [
    "DecodeCapacityError",
    "DecodeFlow",
    "DecodeRecord",
    "DecodeWorker",
    "PrefillUnavailable",
    "PromptTooLargeError",
]

_RESERVE_POLL_S = (0.005, 0.2)  # back-off bounds while waiting for free blocks (never a busy loop)
S = DecodeState


class DecodeFlow:
    def __init__(
        self,
        config: InstanceConfig,
        worker: DecodeWorker,
        channel: Channel,
        targets: dict[str, TransportTarget],
        counters: Counters,
        transfer_metrics: TransferMetrics | None = None,
        clock: Clock = SYSTEM_CLOCK,
        offload: Offload = run_in_executor,
    ) -> None:
        self.config = config
        self.worker = worker
        self.channel = channel
        self.targets = targets
        self.counters = counters
        self.transfer_metrics = transfer_metrics
        self.clock = clock
        self._offload = offload  # the target's forget / revoke (they may wait): off the loop
        self.transitions = Transitions("decode", DECODE_MOVES, counters)
        # req_id -> what the transfer did (for the request's lifecycle record); read once by the runtime.
        self.last_transfer: dict[str, str] = {}
        # req_id -> why it was prefilled here by choice (conditional disaggregation); read once too.
        self.last_local: dict[str, str] = {}
        self.records: dict[str, DecodeRecord] = {}  # by hand-off id (request and attempt)
        self.num_waiting_for_blocks = 0
        self._background: set[asyncio.Task[None]] = set()

    # -- NodeRuntime's DisaggDecoder ----------------------------------------------------------

    async def start_request(
        self, item: WorkItem, prompt: list[int], params: SamplingParams
    ) -> asyncio.Queue[RequestOutput]:
        """Run the hand-off up to admission; the returned queue carries the request's outputs
        (a lone ABORT output when it was cancelled before decoding)."""
        why = await self._local_reason(prompt)
        if why:
            # Conditional disaggregation: no hand-off at all, the engine owns the request from here
            # (no record: a cancel is an engine abort).
            log.info("prefilling locally by choice", reason=why)
            self.counters.inc("local_prefills_cached")
            self.last_local[item.req_id] = why
            return self.worker.submit(item.req_id, prompt, params)
        a = item.assignment
        rec = DecodeRecord(
            item.req_id,
            S.RESERVING,
            handoff=handoff_id(item.req_id, item.attempt),
            peer_id=a.prefill_node_id,
            item=item,
            prompt=prompt,
            params=params,
            protocol=a.protocol or codes.Protocol.TCP,
        )
        self._supersede_earlier_attempts(rec)
        self.records[rec.handoff] = rec
        try:
            outputs = await self._drive(rec)
        except BaseException as exc:
            if rec.is_in(S.RESERVING, S.LANDED):
                self.transitions.move(rec, S.FAILED, "refused", str(exc) or type(exc).__name__)
            elif rec.is_in(S.PREFILLING):  # the runtime is closing: stop P, then release
                self._end_prefill(rec, S.CANCELLING, "shutdown", "instance shutting down")
                self._retire(rec)
            raise
        finally:
            self._forget_if_ended(rec)
        if outputs is None:
            log.info("request cancelled before decoding; nothing runs for it here")
            out_q: asyncio.Queue[RequestOutput] = asyncio.Queue()
            out_q.put_nowait(RequestOutput(req_id=rec.req_id, finish_reason=FinishReason.ABORT))
            return out_q
        return outputs

    def _supersede_earlier_attempts(self, rec: DecodeRecord) -> None:
        """A re-dispatched attempt gets its own reservation at once (everything is keyed by the
        hand-off id): an earlier attempt of the request still handed off here is cancelled, and its
        own fencing frees its blocks whenever P lets go. The same attempt twice is refused."""
        if rec.handoff in self.records:
            raise DecodeCapacityError("this attempt is already being handed off here", req_id=rec.req_id)
        assert rec.item is not None
        if self.cancel(rec.req_id, max_attempt=rec.item.attempt - 1):
            self.counters.inc("handoffs_superseded")
            log.info("an earlier attempt of the request is still handed off here; cancelled it")

    async def _local_reason(self, prompt: list[int]) -> str:
        """Why D should prefill this prompt itself: what its prefix cache lacks is shorter than
        --disagg-min-prefill-tokens ("" otherwise). The frontend already sent the prompts that are
        short as a whole to D alone; here D's own cache makes a long prompt short (multi-turn)."""
        limit = self.config.scheduler.disagg_min_prefill_tokens
        if limit <= 0:
            return ""
        uncached = len(prompt) - await self.worker.cached_prefix_tokens(prompt)
        if uncached >= limit:
            return ""
        return f"{uncached} uncached prompt tokens < --disagg-min-prefill-tokens {limit}"

    def cancel(self, req_id: str, max_attempt: int | None = None) -> bool:
        """The frontend cancelled ``req_id`` (its attempts up to ``max_attempt``, when given: a
        CancelMessage's attempt; a later attempt handed off here meanwhile goes on).
        True when this flow owns the cleanup of one (not admitted yet); False when none is here
        and, for a cancel, the engine has it and an engine abort frees its blocks."""
        owned = False
        for rec in list(self.records.values()):
            if rec.req_id != req_id or rec.state not in DECODE_OWNS_CLEANUP:
                continue
            if max_attempt is not None and (rec.item is None or rec.item.attempt > max_attempt):
                continue
            owned = True
            if rec.is_in(S.RESERVING, S.LANDED):
                self.transitions.move(rec, S.CANCELLED, "cancel", "cancelled by the frontend")
            elif rec.is_in(S.PREFILLING):
                self._end_prefill(rec, S.CANCELLING, "cancel", "cancelled by the frontend")
            # CANCELLING / FAILING: already on their way out, nothing more to do
        return owned

    # -- events from P (event loop) -----------------------------------------------------------

    def on_message(self, conn: Connection, message: CallMessage) -> None:
        rec = self.records.get(message.req_id)
        if rec is None or not rec.is_in(S.PREFILLING):
            self.counters.inc("late_prefill_replies")
            return
        if isinstance(message, PrefillResult):
            self._on_prefill_result(rec, message)
        elif isinstance(message, PrefillFailed):
            self._end_prefill(
                rec, self._failure_state(), "prefill_failed", f"prefill node failed: {message.reason}"
            )

    def on_peer_lost(self, peer_id: str) -> None:
        for rec in list(self.records.values()):
            if rec.peer_id == peer_id and rec.is_in(S.PREFILLING):
                self._end_prefill(
                    rec,
                    self._failure_state(),
                    "peer_lost",
                    f"lost the control connection to prefill node {peer_id}",
                )

    def _on_prefill_result(self, rec: DecodeRecord, result: PrefillResult) -> None:
        status = self.targets[rec.protocol].poll(rec.handoff)
        if not status.is_done:
            reason = f"KV transfer not complete: {status.state.value} {status.reason or ''}".strip()
            self._end_prefill(rec, self._failure_state(), "not_landed", reason)
            return
        rec.result = result
        self._end_prefill(rec, S.LANDED, "landed")

    def _on_timeout(self, rec: DecodeRecord) -> None:
        if rec.is_in(S.PREFILLING):
            reason = f"no prefill result within {self.config.transfer_timeout_s}s"
            self._end_prefill(rec, self._failure_state(), "timeout", reason)

    def _end_prefill(self, rec: DecodeRecord, new: DecodeState, event: str, reason: str = "") -> None:
        """The one way out of PREFILLING. A fallback queues the local prefill in the same step (an
        abort sent from now on follows it). Leaving early hands the reservation to ``_retire``,
        which stops the target accepting writes (``forget`` may wait for a payload being received,
        so it runs off the loop) and fences P before the blocks go back."""
        self.transitions.move(rec, new, event, reason)
        if new is S.FALLING_BACK:
            rec.local_outputs = self._fall_back(rec)
        if rec.prefill_ended is not None and not rec.prefill_ended.done():
            rec.prefill_ended.set_result(None)

    def _failure_state(self) -> DecodeState:
        return S.FALLING_BACK if self.config.pd_fallback == "local" else S.FAILING

    # -- the driver (one coroutine per request) -----------------------------------------------

    async def _drive(self, rec: DecodeRecord) -> asyncio.Queue[RequestOutput] | None:
        await self.worker.validate_prompt(rec.req_id, rec.prompt)
        num_tokens = self._reservation_tokens(rec.req_id, len(rec.prompt))
        if not await self._reserve(rec, num_tokens):
            return None
        self.transitions.move(rec, S.PREFILLING, "reserved")
        await self._remote_prefill(rec)
        if rec.result is not None:  # it landed (LANDED, or CANCELLED from LANDED)
            return await self._admit(rec)
        self._retire(rec)
        if rec.is_in(S.FALLING_BACK):
            assert rec.local_outputs is not None
            return rec.local_outputs
        if rec.is_in(S.FAILING):
            raise PrefillUnavailable(f"remote prefill failed: {rec.reason}")
        return None  # CANCELLING

    def _reservation_tokens(self, req_id: str, num_prompt_tokens: int) -> int:
        """Prompt + headroom, capped at the whole cache. A prompt that can never fit fails now
        instead of waiting for blocks forever."""
        bs, num_blocks = self.worker.block_size, self.worker.num_kv_blocks
        capacity_tokens = num_blocks * bs
        if num_prompt_tokens + 1 > capacity_tokens:  # the prompt and the first token's slot
            raise PromptTooLargeError(
                f"request needs {-(-(num_prompt_tokens + 1) // bs)} KV blocks but this decode node's whole "
                f"cache has {num_blocks}; raise --num-kv-blocks / KV cache memory or shorten the request",
                req_id=req_id,
            )
        return min(num_prompt_tokens + self.config.decode_headroom_tokens, capacity_tokens)

    async def _reserve(self, rec: DecodeRecord, num_tokens: int) -> bool:
        """Reserve KV blocks, waiting (bounded queue, backing off) while the node is full. False:
        cancelled meanwhile (no block is left reserved then)."""
        if self.num_waiting_for_blocks >= self.config.max_waiting_for_blocks:
            raise DecodeCapacityError(
                f"{self.num_waiting_for_blocks} requests already wait for KV blocks on this decode node",
                req_id=rec.req_id,
            )
        delay = _RESERVE_POLL_S[0]
        self.num_waiting_for_blocks += 1
        try:
            while rec.is_in(S.RESERVING):
                try:
                    if self.config.decode_prefix_reuse:
                        rec.block_ids, rec.num_reused_blocks = await self.worker.reserve_reusing(
                            rec.handoff, rec.prompt, num_tokens
                        )
                    else:
                        rec.block_ids = await self.worker.reserve(rec.handoff, num_tokens)
                except OutOfBlocksError:
                    self.counters.inc("reserve_waits")
                    await self.clock.sleep(delay)
                    delay = min(delay * 2, _RESERVE_POLL_S[1])
                    continue
                if rec.is_in(S.RESERVING):
                    return True
                # Cancelled while the reservation was being made: nobody was told about the blocks.
                await self.worker.release_reservation(rec.handoff)
            return False
        finally:
            self.num_waiting_for_blocks -= 1

    async def _remote_prefill(self, rec: DecodeRecord) -> None:
        """Tell the target what to expect, send the task to P, and wait for the transition that
        ends PREFILLING (result, failure, lost peer, timeout or cancel)."""
        target = self.targets.get(rec.protocol)
        if target is None:
            self._end_prefill(
                rec,
                self._failure_state(),
                "refused",
                f"this decode node offers no {rec.protocol!r} transport",
            )
            return
        # Only the blocks D's cache lacks: the reused prefix is neither expected nor written.
        dst = rec.block_ids[rec.num_reused_blocks : -(-len(rec.prompt) // self.worker.block_size)]
        loop = asyncio.get_running_loop()
        rec.prefill_ended = loop.create_future()
        rec.started_s = self.clock.monotonic()
        target.expect(rec.handoff, dst, timeout_s=self.config.transfer_timeout_s)
        timer = loop.create_task(self._time_out(rec), name=f"handoff-timeout-{rec.handoff}")
        # Sending runs beside the wait: a cancel or a lost peer ends PREFILLING even while P has
        # not acknowledged the task yet (a wedged P must not hold the request for a call timeout).
        sender = loop.create_task(self._send_task(rec, target, dst), name=f"handoff-send-{rec.handoff}")
        self._background.add(sender)
        sender.add_done_callback(self._background.discard)
        try:
            await rec.prefill_ended
        finally:
            timer.cancel()

    async def _send_task(self, rec: DecodeRecord, target: TransportTarget, dst: list[int]) -> None:
        assert rec.item is not None
        a = rec.item.assignment
        try:
            rec.conn = await self.channel.connection_to(
                a.prefill_node_id, a.prefill_host, a.prefill_pd_comm_port
            )
            if rec.is_in(S.PREFILLING):
                task = PrefillTask(
                    call_id=0,
                    req_id=rec.handoff,
                    prompt_token_ids=rec.prompt,
                    sampling_params=rec.params,
                    dst_block_ids=dst,
                    skip_blocks=rec.num_reused_blocks,
                    protocol=rec.protocol,
                    endpoint=advertised(target.endpoint(), self.config.advertised_host),
                )
                await self.channel.call(rec.conn, task)
        except SplitwiseError as exc:
            if rec.is_in(S.PREFILLING):  # else a cancel or a reply got there first
                self._end_prefill(rec, self._failure_state(), "unreachable", str(exc))

    async def _time_out(self, rec: DecodeRecord) -> None:
        await self.clock.sleep(self.config.transfer_timeout_s)
        self._on_timeout(rec)

    async def _admit(self, rec: DecodeRecord) -> asyncio.Queue[RequestOutput] | None:
        assert rec.item is not None and rec.result is not None
        # Every write landed (the target said DONE): forget returns at once, but it may lock.
        await self._offload(functools.partial(self.targets[rec.protocol].forget, rec.handoff))
        a = rec.item.assignment
        elapsed_s = self.clock.monotonic() - rec.started_s
        self.counters.inc("transfers_ok")
        self.counters.inc("transfer_latency_ms", int(elapsed_s * 1000))
        num_prompt_blocks = -(-len(rec.prompt) // self.worker.block_size)
        if self.transfer_metrics is not None:
            # Bytes that came in: the reused prefix never travelled.
            self.transfer_metrics.landed(rec.protocol, elapsed_s, num_prompt_blocks - rec.num_reused_blocks)
        landed_ms = round(elapsed_s * 1000, 1)
        log.info(
            "remote prefill landed",
            peer=a.prefill_node_id,
            protocol=rec.protocol,
            num_blocks=len(rec.block_ids),
            reused_blocks=rec.num_reused_blocks,
            ms=landed_ms,
        )
        if rec.num_reused_blocks:
            self.counters.inc("prefix_blocks_reused", rec.num_reused_blocks)
        self.counters.inc("prompt_blocks_handed_off", num_prompt_blocks)
        self.last_transfer[rec.req_id] = (
            f"protocol={rec.protocol} blocks={len(rec.block_ids)} reused={rec.num_reused_blocks} ms={landed_ms}"
        )
        if rec.is_in(S.CANCELLED):  # cancelled once landed: every write is in, the blocks go back now
            await self.worker.release_reservation(rec.handoff)
            return None
        # No await between these two: a cancel from now on is an engine abort, queued after admit.
        self.transitions.move(rec, S.ADMITTED, "admitted")
        first = rec.result
        try:
            return await self.worker.admit_prefilled(
                rec.req_id,
                rec.prompt,
                rec.params,
                PrefilledFirst(
                    first.first_token_id,
                    first.logprob,
                    list(zip(first.top_token_ids, first.top_logprobs, strict=True)),
                    prompt_logprobs_from_wire(
                        first.prompt_logprobs, first.prompt_top_token_ids, first.prompt_top_logprobs
                    ),
                ),
                reservation_id=rec.handoff,
            )
        except EngineError:
            await self.worker.release_reservation(rec.handoff)  # not admitted: nothing else frees it
            raise

    def _fall_back(self, rec: DecodeRecord) -> asyncio.Queue[RequestOutput]:
        self.counters.inc("transfer_failures")
        self.counters.inc("fallbacks")
        if self.transfer_metrics is not None:
            self.transfer_metrics.failed(rec.protocol, rec.history[-1][0])
            self.transfer_metrics.fell_back(rec.protocol)
        log.warning(
            "remote prefill failed; prefilling locally (--pd-fallback local)",
            error=rec.reason,
            peer=rec.peer_id,
        )
        return self.worker.submit(rec.req_id, rec.prompt, rec.params)

    def _retire(self, rec: DecodeRecord) -> None:
        """Release the reservation once P can no longer write into it, then end the record (#11
        fencing). P acknowledges a CancelRequest only after its transport's ``forget`` returned, so
        an Ack means nothing more lands: release (``p_stopped``). No Ack (P gone, wedged, or the
        connection was already closed): ``revoke`` P's access on the target first (rdma: its QPs
        to ERROR) and release once it confirms (``revoked``); unconfirmable (ipc with a wedged P):
        the blocks stay reserved for good (QUARANTINED, ``reservations_quarantined``)."""
        if rec.is_in(S.FAILING):
            self.counters.inc("transfer_failures")
            if self.transfer_metrics is not None:
                self.transfer_metrics.failed(rec.protocol, rec.history[-1][0])
            log.warning("remote prefill failed; failing the request (--pd-fallback fail)", error=rec.reason)
        end = {S.CANCELLING: S.CANCELLED, S.FALLING_BACK: S.FELL_BACK, S.FAILING: S.FAILED}[rec.state]

        async def retire() -> None:
            target = self.targets.get(rec.protocol)
            if target is not None:
                await self._offload(functools.partial(target.forget, rec.handoff))
            if not await self._p_confirmed_stop(rec):
                if target is not None and not await self._offload(
                    functools.partial(target.revoke, rec.peer_id)
                ):
                    self.counters.inc("reservations_quarantined")
                    log.error("could not fence the prefill node; KV blocks stay reserved", peer=rec.peer_id)
                    self.transitions.move(rec, S.QUARANTINED, "unfenced", "revoke not confirmed")
                    self._forget_if_ended(rec)
                    return
                event = "revoked"
            else:
                event = "p_stopped"
            try:
                await self.worker.release_reservation(rec.handoff)
            finally:
                self.transitions.move(rec, end, event)
                self._forget_if_ended(rec)

        task = asyncio.get_running_loop().create_task(retire(), name=f"handoff-retire-{rec.handoff}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _p_confirmed_stop(self, rec: DecodeRecord) -> bool:
        """True when P can no longer write for ``rec``: it was never sent the task (no connection
        yet), or it acknowledged the cancel (after its ``forget``). False otherwise; the
        connection is then closed, which is what makes a live P stop."""
        conn = rec.conn
        if conn is None:
            return True  # no PrefillTask went out: P was never told about the blocks
        if conn.is_closed:
            return False
        try:
            await self.channel.call(
                conn, CancelRequest(call_id=0, req_id=rec.handoff, reason="decode gave up")
            )
            return True
        except SplitwiseError as exc:
            log.warning("prefill node did not confirm the cancel; closing its connection", error=str(exc))
            await self.channel.close_connection(conn, "cancel not confirmed")
            return False

    def _forget_if_ended(self, rec: DecodeRecord) -> None:
        if not self.transitions.moves[rec.state] and self.records.get(rec.handoff) is rec:
            del self.records[rec.handoff]
            rec.ended.set()

    async def close(self) -> None:
        """Wait for the background retirements (bounded by the channel's call timeout)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
