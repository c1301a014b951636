"""Frontend side: runs in every instance's HTTP server process and owns the lifecycle of the
requests it accepted, because only it knows which tokens its clients have received.

Loops (each backs off on Redis errors, logs and counts every failure, never dies on one message):
  results: XREAD BLOCK on this frontend's results stream -> de-duplicate -> per-request ResultStream
  monitor: every heartbeat interval -> Redis restarted? -> refresh cluster view -> expire overdue
           requests -> re-dispatch requests whose node died -> (re)try pending dispatches
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from scheduler.clock import SYSTEM_CLOCK, Clock, ExponentialBackoff
from scheduler.config import SchedulerConfig
from scheduler.connection import REDIS_DOWN_ERRORS, check_server, make_client, server_run_id, stream_entries
from scheduler.dispatch import Dispatcher
from scheduler.errors import (
    DuplicateRequestError,
    MessageDecodeError,
    NoCapacityError,
    SchedulerClosedError,
    SchedulerConnectionError,
)
from scheduler.keys import WORK_GROUP, KeySchema, check_id
from scheduler.messages import (
    RESULT_TYPES,
    Assignment,
    Cancelled,
    CancelMessage,
    Expired,
    Failed,
    Finished,
    KVGeometry,
    ResultMessage,
    SubmitRequest,
    TokenChunk,
    WorkItem,
    decode,
    encode,
)
from scheduler.metrics import Counters
from scheduler.records import add_dead_letter, add_event
from scheduler.registry import ClusterView
from scheduler.streams import ResultStream
from scheduler.tasks import stop_tasks
from splitwise.logging import get_logger

log = get_logger("scheduler.frontend")


@dataclass
class InFlight:
    """What the frontend remembers about one accepted request."""

    request: SubmitRequest
    model_id: str
    stream: ResultStream
    created_ms: int
    deadline_ms: int
    attempt: int = 0
    assignment: Assignment | None = None
    entry_id: bytes | None = None  # the WorkItem's id in the decode node's work stream
    delivered: list[int] = field(default_factory=list)
    first_token_seen: bool = False  # this attempt has produced a token: prefill (and transfer) are done
    pending_since_ms: int | None = None  # waiting for capacity to re-dispatch


class FrontendScheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        *,
        model_id: str,
        kv: KVGeometry | None = None,
        frontend_id: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self.model_id = model_id
        self.kv = kv
        self.frontend_id = check_id("frontend id", frontend_id or f"fe-{uuid.uuid4().hex[:12]}")
        self.keys = KeySchema(config.scheduler_topic)
        self.stats = Counters()
        self._clock = clock
        self._client: aioredis.Redis | None = None
        self._dispatcher: Dispatcher | None = None
        self._view: ClusterView | None = None
        self._inflight: dict[str, InFlight] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._run_id = ""
        self._last_id = b"0-0"
        self._stopping = False
        self._dead_since: dict[str, float] = {}  # node_id -> monotonic time first seen dead

    # --- public API ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, check Redis >= 6.2 and read the cluster. Raises SchedulerConnectionError/RedisVersionError."""
        self._client = make_client(self.config)
        self._run_id = await check_server(self._client, self.config)
        self._dispatcher = Dispatcher(self._client, self.keys)
        self._view = ClusterView(self._client, self.keys)
        await self._refresh_view()
        await self._beat()
        self._tasks = [
            asyncio.create_task(self._results_loop(), name="frontend-results"),
            asyncio.create_task(self._monitor_loop(), name="frontend-monitor"),
        ]
        log.info("frontend_started", frontend_id=self.frontend_id, nodes=len(self._view.nodes))

    async def submit(self, request: SubmitRequest) -> ResultStream:
        """Dispatch one request; its results arrive on the returned stream, ending with exactly one
        terminal message. Raises NoCapacityError (no live compatible pair: HTTP 503),
        SchedulerConnectionError (Redis down: 503), DuplicateRequestError, SchedulerClosedError."""
        if self._client is None:
            raise SchedulerClosedError("frontend scheduler is not started", req_id=request.req_id)
        check_id("req_id", request.req_id)
        if request.req_id in self._inflight:
            raise DuplicateRequestError(
                f"request {request.req_id} is already in flight", req_id=request.req_id
            )
        now = self._clock.time_ms()
        ttl_s = request.ttl_s if request.ttl_s is not None else self.config.scheduler_ttl_s
        fl = InFlight(
            request=request,
            model_id=request.model_id or self.model_id,
            stream=ResultStream(request.req_id),
            created_ms=now,
            deadline_ms=now + int(ttl_s * 1000),
        )
        self._inflight[request.req_id] = fl
        try:
            await self._dispatch(fl)
        except NoCapacityError:
            self._inflight.pop(request.req_id, None)
            self.stats.inc("no_capacity")
            raise
        except REDIS_DOWN_ERRORS as exc:
            self._inflight.pop(request.req_id, None)
            self.stats.inc("redis_errors")
            raise SchedulerConnectionError(f"Redis unavailable: {exc}", req_id=request.req_id) from None
        self.stats.inc("submitted")
        return fl.stream

    async def cancel(self, req_id: str) -> bool:
        """The client went away: end the stream with ``cancelled`` and tell the nodes holding it to drop
        it. Returns False when the request is not in flight (already finished or unknown)."""
        fl = self._inflight.get(req_id)
        if fl is None:
            return False
        await self._finish(fl, Cancelled(req_id=req_id, attempt=fl.attempt), notify_nodes="cancelled")
        return True

    async def close(self) -> None:
        """Stop the loops, fail what is still in flight (``scheduler_closed``), delete our keys."""
        self._stopping = True
        await stop_tasks(
            self._tasks, grace_s=self.config.block_ms / 1000 + self.config.heartbeat_interval_s + 1
        )
        self._tasks = []
        for fl in list(self._inflight.values()):
            try:
                await self._finish(
                    fl,
                    Failed(
                        req_id=fl.request.req_id,
                        attempt=fl.attempt,
                        code="scheduler_closed",
                        message="the frontend scheduler shut down",
                    ),
                    notify_nodes="closed",
                )
            except REDIS_DOWN_ERRORS:
                self._inflight.pop(fl.request.req_id, None)
        if self._client is not None:
            try:
                await self._client.delete(
                    self.keys.results(self.frontend_id), self.keys.frontend_heartbeat(self.frontend_id)
                )
            except REDIS_DOWN_ERRORS as exc:
                log.warning("frontend_close_cleanup_failed", error=str(exc))
            await self._client.aclose()
            self._client = None

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    # --- dispatch -------------------------------------------------------------------------------------
    async def _dispatch(self, fl: InFlight) -> None:
        """Pick + book a pair, then hand the WorkItem to the (decode or mixed) node's work stream."""
        assert self._dispatcher is not None and self._view is not None and self._client is not None
        req = fl.request
        now = self._clock.time_ms()
        assignment = await self._pick(fl, now)
        if assignment is None:
            await self._refresh_view()  # a node may have just joined
            assignment = await self._pick(fl, now)
        if assignment is None:
            raise NoCapacityError(
                f"no live prefill/decode pair or mixed node serves model {fl.model_id!r}", req_id=req.req_id
            )
        item = WorkItem(
            req_id=req.req_id,
            prompt_token_ids=list(req.prompt_token_ids),
            sampling_params=dict(req.sampling_params),
            frontend_id=self.frontend_id,
            created_ms=fl.created_ms,
            deadline_ms=fl.deadline_ms,
            attempt=fl.attempt,
            resume_token_ids=list(fl.delivered),
            assignment=assignment,
        )
        work_key = self.keys.work(assignment.decode_node_id)
        pipe = self._client.pipeline(transaction=False)
        pipe.xadd(work_key, {"m": encode(item)})
        pipe.pexpire(work_key, self.config.ttl_ms)
        detail = (
            f"{assignment.mode} p={assignment.prefill_node_id} d={assignment.decode_node_id} "
            f"protocol={assignment.protocol} attempt={fl.attempt}"
        )
        add_event(
            pipe,
            self.keys,
            req.req_id,
            "dispatched",
            node=self.frontend_id,
            now_ms=now,
            ttl_ms=self._request_ttl_ms(fl, now),
            detail=detail,
        )
        entry_id, *_ = await pipe.execute()
        fl.assignment, fl.entry_id, fl.first_token_seen, fl.pending_since_ms = (
            assignment,
            entry_id,
            False,
            None,
        )

    async def _pick(self, fl: InFlight, now: int) -> Assignment | None:
        assert self._dispatcher is not None and self._view is not None
        for group in self._view.candidate_groups(fl.model_id, self.kv):
            assignment = await self._dispatcher.pick(
                fl.request.req_id,
                group,
                prompt_tokens=len(fl.request.prompt_token_ids) + len(fl.delivered),
                frontend_id=self.frontend_id,
                attempt=fl.attempt,
                now_ms=now,
                expire_at_ms=fl.deadline_ms,
                ttl_ms=self.config.ttl_ms,
            )
            if assignment is not None:
                return assignment
        return None

    def _request_ttl_ms(self, fl: InFlight, now: int) -> int:
        return max(1000, fl.deadline_ms - now + 60_000)  # history outlives the request by a minute

    # --- results ---------------------------------------------------------------------------------------
    async def _results_loop(self) -> None:
        backoff = ExponentialBackoff()
        key = self.keys.results(self.frontend_id)
        while not self._stopping:
            try:
                assert self._client is not None
                answer = await self._client.xread({key: self._last_id}, count=512, block=self.config.block_ms)
                entries = stream_entries(answer)
                batch = self._client.pipeline(transaction=False)
                for entry_id, fields in entries:
                    await self._on_result(fields.get(b"m", b""), batch)
                    self._last_id = entry_id
                if entries:
                    batch.xtrim(key, minid=self._last_id)
                    await batch.execute()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN_ERRORS as exc:
                self.stats.inc("redis_errors")
                log.warning("results_read_failed", error=str(exc))
                await self._clock.sleep(backoff.next_delay_s())
            except Exception:  # the loop must survive anything one message does
                self.stats.inc("results_loop_errors")
                log.exception("results_loop_error")
                await self._clock.sleep(backoff.next_delay_s())

    async def _on_result(self, payload: bytes, batch: Pipeline) -> None:
        try:
            msg: ResultMessage = decode(payload, RESULT_TYPES)
        except MessageDecodeError as exc:
            await self._dead_letter("results:" + self.frontend_id, str(exc), payload)
            return
        fl = self._inflight.get(msg.req_id)
        if fl is None or msg.attempt != fl.attempt:
            self.stats.inc("stale_results")  # finished/cancelled already, or from an abandoned attempt
            return
        if isinstance(msg, TokenChunk):
            self._deliver_tokens(fl, msg)
        elif isinstance(msg, Failed) and msg.retryable:
            await self._redispatch(fl, reason=f"node error {msg.code}: {msg.message}")
        else:
            await self._finish(fl, msg, notify_nodes=None, batch=batch)

    def _deliver_tokens(self, fl: InFlight, chunk: TokenChunk) -> None:
        """Forward only tokens the client has not seen (a re-dispatched node resumes, never repeats)."""
        fl.first_token_seen = True
        skip = len(fl.delivered) - chunk.index
        if skip < 0:
            self.stats.inc("token_gaps")
            log.error(
                "token_gap", req_id=chunk.req_id, expected_index=len(fl.delivered), got_index=chunk.index
            )
            skip = 0
        new_ids = chunk.token_ids[skip:]
        if not new_ids:
            self.stats.inc("duplicate_tokens")
            return
        logprobs = chunk.logprobs[skip:] if chunk.logprobs is not None else None
        fl.stream.put(
            TokenChunk(
                req_id=chunk.req_id,
                attempt=chunk.attempt,
                index=len(fl.delivered),
                token_ids=new_ids,
                logprobs=logprobs,
                top_token_ids=chunk.top_token_ids[skip:] if chunk.top_token_ids is not None else None,
                top_logprobs=chunk.top_logprobs[skip:] if chunk.top_logprobs is not None else None,
                prompt_logprobs=chunk.prompt_logprobs if skip == 0 else None,
                prompt_top_token_ids=chunk.prompt_top_token_ids if skip == 0 else None,
                prompt_top_logprobs=chunk.prompt_top_logprobs if skip == 0 else None,
            )
        )
        fl.delivered.extend(new_ids)

    async def _finish(
        self,
        fl: InFlight,
        terminal: ResultMessage,
        *,
        notify_nodes: str | None,
        batch: Pipeline | None = None,
    ) -> None:
        """Deliver the one terminal message, record it, and clean up what nodes may still hold.
        With ``batch`` the Redis writes join that pipeline (the results loop sends one per read)."""
        if self._inflight.pop(fl.request.req_id, None) is None:
            return
        fl.stream.put(terminal)
        self.stats.inc("terminal_" + terminal.TYPE)
        if self._client is None:
            return
        assert self._dispatcher is not None
        now = self._clock.time_ms()
        req_id = fl.request.req_id
        pipe = batch if batch is not None else self._client.pipeline(transaction=False)
        if notify_nodes is not None:
            self._add_cancels(pipe, fl, notify_nodes)
        detail = getattr(terminal, "code", "") or getattr(terminal, "finish_reason", "")
        add_event(
            pipe,
            self.keys,
            req_id,
            terminal.TYPE,
            node=self.frontend_id,
            now_ms=now,
            ttl_ms=self._request_ttl_ms(fl, now),
            detail=detail,
        )
        pipe.hset(self.keys.request(req_id), mapping={"state": terminal.TYPE, "updated_ms": now})
        pipe.pexpire(self.keys.request(req_id), self._request_ttl_ms(fl, now))
        if not isinstance(terminal, Finished):  # a finished request's nodes released already
            await self._dispatcher.queue_release(pipe, req_id, "pbook", now_ms=now)
            await self._dispatcher.queue_release(pipe, req_id, "dbook", now_ms=now)
        if batch is not None:
            return
        try:
            await pipe.execute()
        except REDIS_DOWN_ERRORS as exc:  # bookings then expire with the request TTL
            self.stats.inc("redis_errors")
            log.warning("finish_cleanup_failed", req_id=req_id, error=str(exc))

    def _add_cancels(self, pipe: Pipeline, fl: InFlight, reason: str) -> None:
        if fl.assignment is None:
            return
        msg = encode(CancelMessage(req_id=fl.request.req_id, attempt=fl.attempt, reason=reason))
        for node_id in fl.assignment.node_ids:
            key = self.keys.control(node_id)
            pipe.xadd(key, {"m": msg}, maxlen=self.config.stream_maxlen, approximate=True)
            pipe.pexpire(key, self.config.ttl_ms)
        if fl.entry_id is not None:  # if it is still queued, it must not run
            work_key = self.keys.work(fl.assignment.decode_node_id)
            pipe.xack(work_key, WORK_GROUP, fl.entry_id)
            pipe.xdel(work_key, fl.entry_id)

    # --- monitor: liveness, expiry, re-dispatch -----------------------------------------------------
    async def _monitor_loop(self) -> None:
        backoff = ExponentialBackoff()
        while not self._stopping:
            try:
                await self._clock.sleep(self.config.heartbeat_interval_s)
                if not self._stopping:
                    await self._monitor_once()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN_ERRORS as exc:
                self.stats.inc("redis_errors")
                log.warning("monitor_redis_error", error=str(exc))
                await self._clock.sleep(backoff.next_delay_s())
            except Exception:
                self.stats.inc("monitor_loop_errors")
                log.exception("monitor_loop_error")
                await self._clock.sleep(backoff.next_delay_s())

    async def _monitor_once(self) -> None:
        assert self._client is not None and self._view is not None
        run_id = await server_run_id(self._client)
        restarted = run_id != self._run_id
        if restarted:
            # Queued work, bookings and our results stream may be gone: every request starts over
            # (with its resume tokens) rather than waiting for results that will never come.
            log.warning("redis_restarted", inflight=len(self._inflight))
            self.stats.inc("redis_restarts")
            self._run_id, self._last_id = run_id, b"0-0"
        await self._refresh_view()
        await self._beat()
        now = self._clock.time_ms()
        for fl in list(self._inflight.values()):
            if now >= fl.deadline_ms:
                await self._finish(
                    fl, Expired(req_id=fl.request.req_id, attempt=fl.attempt), notify_nodes="expired"
                )
            elif restarted:
                await self._redispatch(fl, reason="Redis restarted")
            elif fl.pending_since_ms is not None:
                await self._retry_pending(fl, now)
            elif fl.assignment is None:
                continue  # submit() is dispatching it right now
            elif not self._is_served(fl):
                await self._redispatch(fl, reason="node lost")

    def _is_served(self, fl: InFlight) -> bool:
        a = fl.assignment
        if a is None or self._view is None:
            return False
        if not self._view.is_serving(a.decode_node_id, a.decode_incarnation):
            return False
        # The prefill node matters until the first token shows prefill and KV transfer are done.
        return (
            a.mode == "mixed"
            or fl.first_token_seen
            or self._view.is_serving(a.prefill_node_id, a.prefill_incarnation)
        )

    async def _redispatch(self, fl: InFlight, *, reason: str) -> None:
        req_id = fl.request.req_id
        if fl.attempt >= self.config.max_redispatch:
            self.stats.inc("redispatch_exhausted")
            log.error("redispatch_exhausted", req_id=req_id, attempts=fl.attempt + 1, reason=reason)
            await self._finish(
                fl,
                Failed(
                    req_id=req_id,
                    attempt=fl.attempt,
                    code="node_lost",
                    message=f"{reason}; gave up after {fl.attempt + 1} attempts "
                    f"(--max-redispatch {self.config.max_redispatch})",
                ),
                notify_nodes="failed",
            )
            return
        assert self._client is not None and self._dispatcher is not None
        now = self._clock.time_ms()
        log.warning(
            "redispatching",
            req_id=req_id,
            attempt=fl.attempt + 1,
            reason=reason,
            resume_tokens=len(fl.delivered),
        )
        self.stats.inc("redispatched")
        pipe = self._client.pipeline(transaction=False)
        self._add_cancels(pipe, fl, "redispatched")  # the old attempt may still run somewhere
        add_event(
            pipe,
            self.keys,
            req_id,
            "redispatched",
            node=self.frontend_id,
            now_ms=now,
            ttl_ms=self._request_ttl_ms(fl, now),
            detail=f"{reason}; resume_tokens={len(fl.delivered)}",
        )
        await pipe.execute()
        await self._dispatcher.release_all(req_id, now_ms=now)
        fl.attempt += 1
        fl.assignment, fl.entry_id, fl.pending_since_ms = None, None, now
        await self._retry_pending(fl, now)

    def _still_pending(self, fl: InFlight) -> bool:
        # Awaiting Redis lets the results loop finish (or a cancel end) the request meanwhile.
        return self._inflight.get(fl.request.req_id) is fl and fl.pending_since_ms is not None

    async def _retry_pending(self, fl: InFlight, now: int) -> None:
        """Try to place a request that lost its node; give up after twice the dead-after time."""
        if not self._still_pending(fl):
            return
        try:
            await self._dispatch(fl)
        except NoCapacityError as exc:
            since = fl.pending_since_ms if fl.pending_since_ms is not None else now
            if now - since >= 2 * self.config.dead_after_ms:
                self.stats.inc("no_capacity")
                await self._finish(
                    fl,
                    Failed(
                        req_id=fl.request.req_id, attempt=fl.attempt, code="no_capacity", message=str(exc)
                    ),
                    notify_nodes=None,
                )

    # --- small helpers --------------------------------------------------------------------------------
    async def _refresh_view(self) -> None:
        assert self._view is not None and self._client is not None
        for node_id, reason in (await self._view.refresh()).items():
            payload: bytes = await self._client.hget(self.keys.nodes, node_id) or b""  # type: ignore[assignment]
            await self._client.hdel(self.keys.nodes, node_id)
            await self._dead_letter("nodes:" + node_id, reason, payload)
        await self._reap_dead_nodes()

    async def _reap_dead_nodes(self) -> None:
        """Forget registry entries of nodes dead for a whole TTL, so node churn cannot grow the hash.
        (A node that comes back re-adds itself on its next heartbeat.)"""
        assert self._view is not None and self._client is not None
        now = self._clock.monotonic()
        for node_id in set(self._dead_since) - set(self._view.nodes):
            del self._dead_since[node_id]
        for node_id, state in self._view.nodes.items():
            if state.alive:
                self._dead_since.pop(node_id, None)
                continue
            since = self._dead_since.setdefault(node_id, now)
            if now - since >= self.config.scheduler_ttl_s:
                await self._client.hdel(self.keys.nodes, node_id)
                del self._dead_since[node_id]
                self.stats.inc("nodes_reaped")
                log.info("node_reaped", node_id=node_id, dead_for_s=round(now - since, 1))

    async def _beat(self) -> None:
        assert self._client is not None
        pipe = self._client.pipeline(transaction=False)
        pipe.set(
            self.keys.frontend_heartbeat(self.frontend_id), len(self._inflight), px=self.config.dead_after_ms
        )
        pipe.pexpire(self.keys.results(self.frontend_id), self.config.ttl_ms)
        await pipe.execute()

    async def _dead_letter(self, source: str, reason: str, payload: bytes) -> None:
        self.stats.inc("dead_letters")
        log.error("dead_letter", source=source, reason=reason, size_bytes=len(payload))
        assert self._client is not None
        pipe = self._client.pipeline(transaction=False)
        add_dead_letter(
            pipe,
            self.keys,
            source=source,
            reason=reason,
            payload=payload,
            now_ms=self._clock.time_ms(),
            ttl_ms=self.config.dead_letter_ttl_ms,
        )
        try:
            await pipe.execute()
        except REDIS_DOWN_ERRORS as exc:
            log.warning("dead_letter_write_failed", error=str(exc))
