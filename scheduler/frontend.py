"""Frontend side: runs in every instance's HTTP server process and owns the lifecycle of the
requests it accepted, because only it knows which tokens its clients have received.

  heartbeat thread: lease in {t}:frontends, server time, Redis data epoch, results trimming
  results loop: [log records + XREAD BLOCK] in one round trip -> de-duplicate -> ResultStreams
  monitor loop (every heartbeat interval): Redis lost its data? -> refresh cluster view -> sweep
           expired bookings -> expire overdue requests -> re-dispatch requests whose node's lease
           lapsed (confirmed an interval later) -> (re)try pending dispatches
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from typing import Any

import redis
import redis.asyncio as aioredis

from scheduler import scripts
from scheduler.clock import SYSTEM_CLOCK, Clock
from scheduler.config import SchedulerConfig
from scheduler.connection import REDIS_DOWN_ERRORS, after_id, check_server, make_client
from scheduler.dispatch import Dispatcher, queue_release
from scheduler.errors import (
    DuplicateRequestError,
    NoCapacityError,
    SchedulerClosedError,
    SchedulerConnectionError,
)
from scheduler.frontend_dispatch import FrontendDispatch
from scheduler.frontend_monitor import Monitor
from scheduler.frontend_record import FrontendRecord
from scheduler.frontend_results import ResultsReader
from scheduler.heartbeat import Heartbeater
from scheduler.keys import ROLE_LETTERS, KeySchema, check_id
from scheduler.lease import ServerClock
from scheduler.messages import (
    Cancelled,
    CancelMessage,
    Failed,
    Finished,
    KVGeometry,
    ResultMessage,
    SubmitRequest,
    encode,
)
from scheduler.metrics import Counters
from scheduler.outbox import log_fields
from scheduler.poison import Repairer, frontend_key_types, republish_view
from scheduler.records import lines, write_dead_letter
from scheduler.registry import ClusterView, node_group
from scheduler.retry import Retrier
from scheduler.scripting import Batch
from scheduler.states import FRONTEND_TERMINAL_STATES, FrontendState
from scheduler.streams import ResultStream
from scheduler.tasks import stop_tasks
from splitwise.codes import FailureCode
from splitwise.logging import get_logger

log = get_logger("scheduler.frontend")

SUBMIT_RETRY_S = 1.0


class FrontendScheduler(FrontendDispatch):
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
        self.server_clock = ServerClock(clock)
        self._retrier = Retrier(clock, self.stats)
        self._client: aioredis.Redis | None = None
        self._dispatcher: Dispatcher | None = None
        self._view: ClusterView | None = None
        self._monitor: Monitor | None = None
        self._heartbeater: Heartbeater | None = None
        self._inflight: dict[str, FrontendRecord] = {}
        self._records: list[tuple[str, str]] = []  # (req_id, record text) not yet in {t}:log
        self._tasks: list[asyncio.Task[None]] = []
        self._results = ResultsReader(self)
        self.epoch_seen = ""
        # node -> id of its re-created work stream: items queued before it were lost (the monitor re-dispatches)
        self.lost_work_streams: dict[str, tuple[int, int]] = {}
        self.results_lost = False  # set when a repair replaced our results stream (the monitor reads it)
        self._stopping = False

    # --- public API ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, check Redis >= 6.2 and read the cluster. Raises SchedulerConnectionError/RedisVersionError."""
        self._client = make_client(self.config)
        await check_server(self._client, self.config)
        self._dispatcher = Dispatcher(
            self._client,
            self.keys,
            min_prefill_tokens=self.config.disagg_min_prefill_tokens,
            max_prefill_queue=self.config.disagg_max_prefill_queue,
            overlap_weights=(self.config.kv_overlap_weight_prefill, self.config.kv_overlap_weight_decode),
            stream_maxlen=self.config.stream_maxlen,
            stream_ttl_ms=self.config.ttl_ms,
            prefill_balance_tokens=self.config.kv_prefill_balance_tokens,
        )
        self._view = ClusterView(self._client, self.keys)
        types = lambda: frontend_key_types(self.keys, self.frontend_id, self._view_candidate_keys())  # noqa: E731
        self._repairer = Repairer(
            self.keys, self.config, self.stats, types, who=self.frontend_id, after=self._after_repair
        )
        self._retrier.repair = self._repair
        beat = self._repairer.guard(self._beat)
        self._heartbeater = Heartbeater(
            f"frontend-heartbeat-{self.frontend_id}", self.config, self._retrier, beat
        )
        await self._heartbeater.start()
        self._monitor = Monitor(self, self._client, self._view, self.epoch_seen)
        await self._retrier.call("refresh_view", self._monitor.refresh_view, give_up_after_s=SUBMIT_RETRY_S)
        self._tasks = [
            asyncio.create_task(
                self._retrier.loop("frontend_results", self._results.once, running=self._running),
                name="frontend-results",
            ),
            asyncio.create_task(
                self._retrier.loop("frontend_monitor", self._monitor.tick, running=self._running),
                name="frontend-monitor",
            ),
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
        fl = FrontendRecord(
            request=request,
            model_id=request.model_id or self.model_id,
            stream=ResultStream(request.req_id),
            created_ms=now,
            deadline_ms=now + int(ttl_s * 1000),
        )
        self._inflight[request.req_id] = fl
        try:
            # A blip (a pooled connection that died with a restarted server) is retried briefly.
            await self._retrier.call("submit", lambda: self.dispatch(fl), give_up_after_s=SUBMIT_RETRY_S)
        except NoCapacityError:
            self._inflight.pop(request.req_id, None)
            self.stats.inc("no_capacity")
            raise
        except SchedulerConnectionError as exc:
            self._inflight.pop(request.req_id, None)
            raise SchedulerConnectionError(str(exc), req_id=request.req_id) from None
        self.stats.inc("submitted")
        return fl.stream

    async def cancel(self, req_id: str) -> bool:
        """The client went away: end the stream with ``cancelled`` and tell the nodes holding it to drop
        it. Returns False when the request is not in flight (already finished or unknown)."""
        fl = self._inflight.get(req_id)
        if fl is None:
            return False
        await self.finish(fl, Cancelled(req_id=req_id, attempt=fl.attempt), notify_nodes="cancelled")
        return True

    async def close(self) -> None:
        """Stop the loops, fail what is still in flight (``scheduler_closed``), end our lease."""
        self._stopping = True
        await stop_tasks(
            self._tasks, grace_s=self.config.block_ms / 1000 + self.config.heartbeat_interval_s + 1
        )
        self._tasks = []
        if self._heartbeater is not None:
            await self._heartbeater.stop()
        for fl in list(self._inflight.values()):
            try:
                await self.fail(
                    fl,
                    FailureCode.SCHEDULER_CLOSED,
                    "the frontend scheduler shut down",
                    notify_nodes="closed",
                )
            except REDIS_DOWN_ERRORS:
                self._inflight.pop(fl.req_id, None)
        if self._client is not None:
            try:
                batch = Batch(self._client)
                self.take_records(batch)
                batch.add(lambda pipe: pipe.zrem(self.keys.frontends, self.frontend_id))
                batch.add(lambda pipe: pipe.delete(self.keys.results(self.frontend_id)))
                batch.add(lambda pipe: pipe.delete(self.keys.results_read(self.frontend_id)))
                await batch.execute()
            except REDIS_DOWN_ERRORS as exc:
                log.warning("frontend_close_cleanup_failed", error=str(exc))
            await self._client.aclose()
            self._client = None

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    @property
    def inflight(self) -> dict[str, FrontendRecord]:
        return self._inflight

    def _running(self) -> bool:
        return not self._stopping

    # --- dispatch -------------------------------------------------------------------------------------
    # --- endings ----------------------------------------------------------------------------------------
    async def finish(
        self,
        fl: FrontendRecord,
        terminal: ResultMessage,
        *,
        notify_nodes: str | None,
        batch: Batch | None = None,
    ) -> None:
        """Deliver the one terminal message, record it, and clean up what nodes may still hold.
        With ``batch`` the Redis writes join that batch (the results loop sends one per read)."""
        if self._inflight.get(fl.req_id) is not fl or not fl.move(
            FRONTEND_TERMINAL_STATES[terminal.TYPE], self.stats, why=terminal.TYPE
        ):
            return
        del self._inflight[fl.req_id]
        fl.stream.put(terminal)
        self.stats.inc("terminal_" + terminal.TYPE)
        detail = getattr(terminal, "code", "") or getattr(terminal, "finish_reason", "")
        fl.note(self._clock.time_ms(), terminal.TYPE, self.frontend_id, detail)
        self._records.append((fl.req_id, lines(fl.take_events())))
        if self._client is None or isinstance(terminal, Finished):
            return  # a finished request's nodes released its bookings already
        own = batch if batch is not None else Batch(self._client)
        if notify_nodes is not None:
            self.queue_cancels(own, fl, notify_nodes)
        if fl.assignment is not None:
            queue_release(own, self.keys, list(fl.assignment.bookings))
        if batch is not None:
            return
        try:
            await own.execute()
        except REDIS_DOWN_ERRORS as exc:  # bookings then expire with the request TTL
            self.stats.inc("redis_errors")
            log.warning("finish_cleanup_failed", req_id=fl.req_id, error=str(exc))

    async def fail(
        self, fl: FrontendRecord, code: FailureCode, message: str, *, notify_nodes: str | None
    ) -> None:
        """End ``fl`` with an explicit error (``Failed`` with ``code``)."""
        await self.finish(
            fl,
            Failed(req_id=fl.req_id, attempt=fl.attempt, code=code, message=message),
            notify_nodes=notify_nodes,
        )

    def queue_cancels(self, batch: Batch, fl: FrontendRecord, reason: str) -> None:
        if fl.assignment is None:
            return
        msg = encode(CancelMessage(req_id=fl.req_id, attempt=fl.attempt, reason=reason))
        for node_id in fl.assignment.node_ids:
            key = self.keys.control(node_id)
            batch.add(
                lambda pipe, key=key: pipe.xadd(  # type: ignore[misc]
                    key, {"m": msg}, maxlen=self.config.stream_maxlen, approximate=True
                )
            )
            batch.add(lambda pipe, key=key: pipe.pexpire(key, self.config.ttl_ms))  # type: ignore[misc]
        if fl.entry_id is not None:  # if it is still queued, it must not run
            work_key, entry_id = self.keys.work(fl.assignment.decode_node_id), fl.entry_id
            batch.add(lambda pipe: pipe.xdel(work_key, entry_id))

    async def redispatch(self, fl: FrontendRecord, *, reason: str) -> None:
        """Abandon the current attempt (its node is gone or gave up) and place the request again,
        resuming after the tokens the client already has."""
        if fl.attempt >= self.config.max_redispatch:
            self.stats.inc("redispatch_exhausted")
            log.error("redispatch_exhausted", req_id=fl.req_id, attempts=fl.attempt + 1, reason=reason)
            message = f"{reason}; gave up after {fl.attempt + 1} attempts (--max-redispatch {self.config.max_redispatch})"
            await self.fail(fl, FailureCode.NODE_LOST, message, notify_nodes="failed")
            return
        if not fl.move(FrontendState.PENDING, self.stats, why=reason):
            return
        assert self._client is not None
        log.warning(
            "redispatching",
            req_id=fl.req_id,
            attempt=fl.attempt + 1,
            reason=reason,
            resume_tokens=len(fl.delivered),
        )
        self.stats.inc("redispatched")
        fl.note(
            self._clock.time_ms(),
            "redispatched",
            self.frontend_id,
            f"{reason}; resume_tokens={len(fl.delivered)}",
        )
        batch = Batch(self._client)
        self.queue_cancels(batch, fl, "redispatched")  # the old attempt may still run somewhere
        if fl.assignment is not None:
            queue_release(batch, self.keys, list(fl.assignment.bookings))
        await batch.execute()
        fl.attempt += 1
        fl.assignment, fl.entry_id, fl.pending_since_ms = None, None, self._clock.time_ms()
        await self.retry_pending(fl)

    async def retry_pending(self, fl: FrontendRecord) -> None:
        """Try to place a request that lost its node; give up after twice the dead-after time."""
        if self._inflight.get(fl.req_id) is not fl or fl.state is not FrontendState.PENDING:
            return  # finished or cancelled while we awaited Redis
        try:
            await self.dispatch(fl)
        except NoCapacityError as exc:
            now = self._clock.time_ms()
            since = fl.pending_since_ms if fl.pending_since_ms is not None else now
            if now - since >= 2 * self.config.dead_after_ms:
                self.stats.inc("no_capacity")
                await self.fail(fl, FailureCode.NO_CAPACITY, str(exc), notify_nodes=None)

    # --- heartbeat (thread) and small helpers ---------------------------------------------------------
    def _beat(self, client: redis.Redis) -> None:
        """Heartbeat thread: extend our lease, learn server time and the data epoch, trim results."""
        last = after_id(self._results.last_id.decode())
        now_ms, epoch = scripts.FRONTEND_BEAT.call_sync(
            client,
            [
                self.keys.frontends,
                self.keys.results(self.frontend_id),
                self.keys.bookings,
                self.keys.epoch,
                self.keys.log,
            ],
            [self.frontend_id, self.config.dead_after_ms, self.config.ttl_ms, secrets.token_hex(8), last],
        )
        self.server_clock.observe(int(now_ms))
        self.epoch_seen = epoch.decode() if isinstance(epoch, bytes) else str(epoch)

    def _view_candidate_keys(self) -> list[str]:
        groups = {node_group(s.info) for s in self._view.nodes.values()} if self._view else set()
        return [self.keys.candidates(g, letter) for g in sorted(groups) for letter in ROLE_LETTERS.values()]

    async def _repair(self) -> None:
        """A loop or a dispatch met a key of the wrong type (scheduler.poison): repair, put back what
        our view knows of the registry, and start our results over if that stream was lost."""
        fixed = await self._repairer.run(self.client)
        if fixed and self._view is not None:
            pipe = self.client.pipeline(transaction=False)
            republish_view(pipe, self.keys, self._view, fixed)
            await pipe.execute()

    def _after_repair(self, fixed: dict[str, str]) -> None:
        """(Any thread.) A repaired results stream lost what it held: re-dispatch every request."""
        if self.keys.results(self.frontend_id) in fixed:
            self.results_lost = True

    def restart_reading(self) -> None:
        """Redis lost its data: our results stream starts afresh."""
        self._results.last_id = b"0-0"

    async def flush_records(self) -> None:
        """Write the records of ended requests now (they otherwise ride on the next results read)."""
        if self._client is not None and self._records:
            batch = Batch(self._client)
            self.take_records(batch)
            await batch.execute()

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise SchedulerClosedError("frontend scheduler is not started")
        return self._client

    def take_records(self, batch: Batch) -> None:
        if not self._records:
            return
        fields: dict[Any, Any] = dict(log_fields(self._records))
        self._records = []
        batch.add(
            lambda pipe: pipe.xadd(
                self.keys.log, fields, maxlen=self.config.log_maxlen, approximate=True, nomkstream=True
            )
        )

    async def dead_letter(self, source: str, reason: str, payload: bytes) -> None:
        assert self._client is not None
        await write_dead_letter(
            self._client, self.keys, self.config, self.stats, self._clock, source, reason, payload
        )
