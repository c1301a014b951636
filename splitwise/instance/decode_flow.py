"""Decode side of a disaggregated request (D drives; see docs/architecture.md steps 4-7).

    reserve blocks (bounded wait) -> target.expect -> PrefillTask to P -> PrefillResult
    -> every layer landed? -> admit with the first token -> decode (NodeRuntime streams it)

Failure (P unreachable, P reports failure, transfer failed or timed out): with ``--pd-fallback
local`` the request is prefilled here instead, logged and counted; with ``fail`` it fails with
an explicit error. The reservation of a failed transfer is released only once P can no longer
write into it (P acknowledged the cancel, or P's connection is gone): one-sided writes (ipc,
rdma) would otherwise land in blocks another request already uses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

from scheduler.messages import WorkItem
from splitwise.engine.errors import EngineError, InvalidRequestError, OutOfBlocksError
from splitwise.engine.outputs import RequestOutput
from splitwise.engine.prompt_logprobs import from_wire as prompt_logprobs_from_wire
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import FinishReason
from splitwise.errors import SplitwiseError
from splitwise.instance.config import InstanceConfig
from splitwise.instance.engine_worker import EngineWorker
from splitwise.instance.pd_channel import PDChannel
from splitwise.instance.transfer_metrics import TransferMetrics
from splitwise.logging import get_logger
from splitwise.transfer.base import TransferCounters, TransportTarget
from splitwise.transfer.control_connection import ControlConnection
from splitwise.transfer.messages import CallMessage, CancelRequest, PrefillFailed, PrefillResult, PrefillTask

log = get_logger(__name__)

_RESERVE_POLL_S = (0.005, 0.2)  # back-off bounds while waiting for free blocks (never a busy loop)


class PrefillUnavailable(SplitwiseError):
    """The remote prefill did not produce usable KV (P lost, refused, failed, or transfer failed)."""

    retryable = True


class RequestCancelled(SplitwiseError):
    """The frontend cancelled the request before it entered the running batch."""

    retryable = False


class PromptTooLargeError(InvalidRequestError):
    """The prompt cannot fit this decode node's whole KV cache, however long it waits (HTTP 400:
    like a prompt past max_model_len, no retry can help)."""

    retryable = False


class DecodeCapacityError(EngineError):
    """Too many requests already wait for KV blocks on this decode node."""

    retryable = True


@dataclasses.dataclass
class _Pending:
    future: asyncio.Future[PrefillResult]
    peer_id: str
    started_s: float


class DecodeFlow:
    def __init__(
        self,
        config: InstanceConfig,
        worker: EngineWorker,
        channel: PDChannel,
        targets: dict[str, TransportTarget],
        counters: TransferCounters,
        transfer_metrics: TransferMetrics | None = None,
    ) -> None:
        self.config = config
        self.worker = worker
        self.channel = channel
        self.targets = targets
        self.counters = counters
        self.transfer_metrics = transfer_metrics
        # req_id -> what the transfer did (for the request's lifecycle record); read once by the runtime.
        self.last_transfer: dict[str, str] = {}
        self._pending: dict[str, _Pending] = {}
        # Requests between work item and admission (reserving, remote prefill): this flow owns their
        # cleanup, because P may still write into their reserved blocks. ``_cancelled``: of those,
        # the ones the frontend cancelled.
        self._starting: set[str] = set()
        self._cancelled: set[str] = set()
        self.num_waiting_for_blocks = 0
        self._background: set[asyncio.Task[None]] = set()

    # -- NodeRuntime's DisaggDecoder ----------------------------------------------------------

    async def start_request(
        self, item: WorkItem, prompt: list[int], params: SamplingParams
    ) -> asyncio.Queue[RequestOutput]:
        req_id = item.req_id
        self._starting.add(req_id)
        try:
            return await self._start(item, prompt, params)
        except RequestCancelled:
            log.info("request cancelled before decoding; nothing runs for it here")
            out_q: asyncio.Queue[RequestOutput] = asyncio.Queue()
            out_q.put_nowait(RequestOutput(req_id=req_id, finish_reason=FinishReason.ABORT))
            return out_q
        finally:
            self._starting.discard(req_id)
            self._cancelled.discard(req_id)

    async def _start(
        self, item: WorkItem, prompt: list[int], params: SamplingParams
    ) -> asyncio.Queue[RequestOutput]:
        req_id = item.req_id
        await self.worker.call(lambda e: e.validate_prompt(prompt, req_id=req_id))
        block_ids = await self._reserve(req_id, self._reservation_tokens(req_id, len(prompt)))
        if req_id in self._cancelled:  # cancelled while reserving: nobody was told about the blocks
            await self.worker.call(lambda e: e.release_reservation(req_id))
            raise RequestCancelled("cancelled while waiting for KV blocks")
        started = time.monotonic()
        try:
            first = await self._remote_prefill(item, prompt, params, block_ids)
        except RequestCancelled:
            raise  # _remote_prefill retires the reservation once P stopped writing
        except (PrefillUnavailable, SplitwiseError) as exc:
            if req_id in self._cancelled:
                raise RequestCancelled("cancelled during the remote prefill") from None
            self._starting.discard(req_id)  # from the submit on, the engine owns it (abort works)
            return await self._fallback(item, prompt, params, exc)
        self.counters.incr("transfers_ok")
        self.counters.incr("transfer_latency_ms", int((time.monotonic() - started) * 1000))
        if self.transfer_metrics is not None:
            num_prompt_blocks = -(-len(prompt) // self.worker.engine.config.block_size)
            self.transfer_metrics.landed(
                item.assignment.protocol or "tcp", time.monotonic() - started, num_prompt_blocks
            )
        landed_ms = round((time.monotonic() - started) * 1000, 1)
        log.info(
            "remote prefill landed",
            peer=item.assignment.prefill_node_id,
            protocol=item.assignment.protocol,
            num_blocks=len(block_ids),
            ms=landed_ms,
        )
        self.last_transfer[req_id] = (
            f"protocol={item.assignment.protocol} blocks={len(block_ids)} ms={landed_ms}"
        )
        if req_id in self._cancelled:  # every write landed, so the blocks can go back at once
            await self.worker.call(lambda e: e.release_reservation(req_id))
            raise RequestCancelled("cancelled once the remote prefill had landed")
        out_q = self.worker.attach(req_id)

        def admit(engine: Any) -> None:
            first_out = engine.add_prefilled_request(
                req_id,
                prompt,
                params,
                first.first_token_id,
                first.logprob,
                list(zip(first.top_token_ids, first.top_logprobs, strict=True)),
                prompt_logprobs_from_wire(
                    first.prompt_logprobs, first.prompt_top_token_ids, first.prompt_top_logprobs
                ),
            )
            self.worker.deliver_from_engine_thread([first_out])

        # No await between these two: a cancel from now on is an engine abort, queued after admit.
        self._starting.discard(req_id)
        await self.worker.call(admit)
        return out_q

    def cancel(self, req_id: str) -> bool:
        """The frontend cancelled ``req_id``. True when this flow owns its cleanup (not admitted
        yet); False when the engine has it and an engine abort frees its blocks."""
        if req_id not in self._starting:
            return False
        self._cancelled.add(req_id)
        pending = self._pending.get(req_id)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(RequestCancelled("cancelled by the frontend"))
        return True

    # -- messages from P (event loop) ---------------------------------------------------------

    def on_message(self, conn: ControlConnection, message: CallMessage) -> None:
        pending = self._pending.get(message.req_id)
        if pending is None or pending.future.done():
            self.counters.incr("late_prefill_replies")
            return
        if isinstance(message, PrefillResult):
            pending.future.set_result(message)
        elif isinstance(message, PrefillFailed):
            pending.future.set_exception(PrefillUnavailable(f"prefill node failed: {message.reason}"))

    def on_peer_lost(self, peer_id: str) -> None:
        for pending in self._pending.values():
            if pending.peer_id == peer_id and not pending.future.done():
                pending.future.set_exception(
                    PrefillUnavailable(f"lost the control connection to prefill node {peer_id}")
                )

    # -- steps --------------------------------------------------------------------------------

    def _reservation_tokens(self, req_id: str, num_prompt_tokens: int) -> int:
        """Prompt + headroom, capped at the whole cache. A prompt that can never fit fails now
        instead of waiting for blocks forever."""
        bm = self.worker.engine.block_manager  # its size never changes: safe to read off the engine thread
        capacity_tokens = bm.num_blocks * bm.block_size
        if num_prompt_tokens + 1 > capacity_tokens:  # the prompt and the first token's slot
            raise PromptTooLargeError(
                f"request needs {bm.num_blocks_for(num_prompt_tokens + 1)} KV blocks but this decode node's whole "
                f"cache has {bm.num_blocks}; raise --num-kv-blocks / KV cache memory or shorten the request",
                req_id=req_id,
            )
        return min(num_prompt_tokens + self.config.decode_headroom_tokens, capacity_tokens)

    async def _reserve(self, req_id: str, num_tokens: int) -> list[int]:
        """Reserve KV blocks, waiting (bounded queue, backing off) while the node is full."""
        if self.num_waiting_for_blocks >= self.config.max_waiting_for_blocks:
            raise DecodeCapacityError(
                f"{self.num_waiting_for_blocks} requests already wait for KV blocks on this decode node",
                req_id=req_id,
            )
        delay = _RESERVE_POLL_S[0]
        self.num_waiting_for_blocks += 1
        try:
            while True:
                if req_id in self._cancelled:
                    raise RequestCancelled("cancelled while waiting for KV blocks")
                try:
                    return await self.worker.call(lambda e: e.reserve(req_id, num_tokens))
                except OutOfBlocksError:
                    self.counters.incr("reserve_waits")
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RESERVE_POLL_S[1])
        finally:
            self.num_waiting_for_blocks -= 1

    async def _remote_prefill(
        self, item: WorkItem, prompt: list[int], params: SamplingParams, block_ids: list[int]
    ) -> PrefillResult:
        a = item.assignment
        req_id = item.req_id
        protocol = a.protocol or "tcp"
        target = self.targets.get(protocol)
        if target is None:
            raise PrefillUnavailable(f"this decode node offers no {protocol!r} transport")
        num_prompt_blocks = -(-len(prompt) // self.worker.engine.config.block_size)
        dst = block_ids[:num_prompt_blocks]
        target.expect(req_id, dst, timeout_s=self.config.transfer_timeout_s)
        future: asyncio.Future[PrefillResult] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = _Pending(future, a.prefill_node_id, time.monotonic())
        conn: ControlConnection | None = None
        try:
            conn = await self.channel.connection_to(a.prefill_node_id, a.prefill_host, a.prefill_pd_comm_port)
            task = PrefillTask(
                call_id=0,
                req_id=req_id,
                prompt_token_ids=prompt,
                sampling_params=_params_dict(params),
                dst_block_ids=dst,
                protocol=protocol,
                endpoint=target.endpoint(),
            )
            await self.channel.call(conn, task)
            result = await asyncio.wait_for(future, self.config.transfer_timeout_s)
            status = target.poll(req_id)
            if not status.is_done:
                raise PrefillUnavailable(
                    f"KV transfer not complete: {status.state.value} {status.reason or ''}".strip()
                )
            target.forget(req_id)
            return result
        except BaseException:
            target.forget(req_id)
            self._retire_reservation(req_id, conn, target, a.prefill_node_id)
            raise
        finally:
            self._pending.pop(req_id, None)

    async def _fallback(
        self, item: WorkItem, prompt: list[int], params: SamplingParams, exc: BaseException
    ) -> asyncio.Queue[RequestOutput]:
        self.counters.incr("transfer_failures")
        protocol = item.assignment.protocol or "tcp"
        if self.transfer_metrics is not None:
            self.transfer_metrics.failed(protocol, type(exc).__name__)
        if self.config.pd_fallback == "fail":
            log.warning("remote prefill failed; failing the request (--pd-fallback fail)", error=str(exc))
            raise PrefillUnavailable(f"remote prefill failed: {exc}") from None
        self.counters.incr("fallbacks")
        if self.transfer_metrics is not None:
            self.transfer_metrics.fell_back(protocol)
        log.warning(
            "remote prefill failed; prefilling locally (--pd-fallback local)",
            error=str(exc),
            peer=item.assignment.prefill_node_id,
        )
        return self.worker.submit(item.req_id, prompt, params)

    def _retire_reservation(
        self, req_id: str, conn: ControlConnection | None, target: TransportTarget, peer_id: str
    ) -> None:
        """Release the reservation once P can no longer write into it."""

        async def retire() -> None:
            confirmed = conn is None  # no PrefillTask went out: P was never told about the blocks
            if conn is not None and not conn.is_closed:
                try:
                    # P acks only after its transport's forget() returned: nothing more lands (#11).
                    await self.channel.call(
                        conn, CancelRequest(call_id=0, req_id=req_id, reason="decode gave up")
                    )
                    confirmed = True
                except SplitwiseError as exc:
                    # No answer: P is gone or wedged. Closing the connection is what makes P stop.
                    log.warning(
                        "prefill node did not confirm the cancel; closing its connection", error=str(exc)
                    )
                    conn.close("cancel not confirmed")
            if not confirmed:
                # #11 fencing: no acknowledgement, so cut P's transport access (rdma: its QPs to
                # ERROR) before the blocks go back; unconfirmable (ipc, wedged P): quarantine them.
                fenced = await asyncio.get_running_loop().run_in_executor(None, target.revoke, peer_id)
                if not fenced:
                    self.counters.incr("reservations_quarantined")
                    log.error("could not fence the prefill node; KV blocks stay reserved", peer=peer_id)
                    return
            try:
                await self.worker.call(lambda e: e.release_reservation(req_id))
            except EngineError:
                pass  # already released (e.g. the request was aborted meanwhile)

        task = asyncio.get_running_loop().create_task(retire())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _params_dict(params: SamplingParams) -> dict[str, Any]:
    raw = dataclasses.asdict(params)
    raw["stop"] = list(params.stop)
    raw["stop_token_ids"] = list(params.stop_token_ids)
    return raw
