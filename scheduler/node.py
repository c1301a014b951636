"""Node side: runs in every instance, next to the engine loop.

  start(info) -> register + heartbeat loop (with the load provider) + control-stream loop
  engine loop: next_work() -> run it -> publish() per token chunk -> terminal -> ack()
  prefill node (disagg): after the prefill and KV send for a request -> release_prefill(req_id)
  cancellations(): the CancelMessages for this node (client gone, expired, re-dispatched elsewhere)

Work is taken with XREADGROUP, so it stays in the stream's pending list until ``ack``: a crash
never loses it, and the originating frontend re-dispatches it (or fails it explicitly).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from scheduler import scripts
from scheduler.clock import SYSTEM_CLOCK, Clock, ExponentialBackoff
from scheduler.config import SchedulerConfig
from scheduler.connection import REDIS_DOWN_ERRORS, StreamEntry, check_server, make_client, stream_entries
from scheduler.dispatch import Dispatcher
from scheduler.errors import (
    MessageDecodeError,
    SchedulerClosedError,
    SchedulerConnectionError,
    UnknownRequestError,
)
from scheduler.keys import WORK_GROUP, KeySchema, check_id
from scheduler.messages import (
    CancelMessage,
    Expired,
    Failed,
    LoadReport,
    NodeInfo,
    ResultMessage,
    WorkItem,
    decode,
    encode,
)
from scheduler.metrics import Counters
from scheduler.records import add_dead_letter, add_event
from scheduler.tasks import stop_tasks
from splitwise.logging import get_logger

log = get_logger("scheduler.node")

LoadProvider = Callable[[], LoadReport]
T = TypeVar("T")


@dataclass
class _Held:
    entry_id: bytes
    item: WorkItem
    terminal_sent: bool = False


class NodeAgent:
    def __init__(
        self,
        config: SchedulerConfig,
        *,
        load_provider: LoadProvider | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self.keys = KeySchema(config.scheduler_topic)
        self.stats = Counters()
        self._load_provider = load_provider or LoadReport
        self._clock = clock
        self._client: aioredis.Redis | None = None
        self._info: NodeInfo | None = None
        self._info_payload = b""
        self._held: dict[tuple[str, int], _Held] = {}  # (req_id, attempt): a node may hold two attempts
        self._cancelled: dict[str, int] = {}  # req_id -> highest cancelled attempt (bounded, see _remember)
        self._cancel_queue: asyncio.Queue[CancelMessage] = asyncio.Queue(maxsize=10_000)
        self._tasks: list[asyncio.Task[None]] = []
        self._read_pending = True  # first read drains entries delivered to an earlier incarnation
        self._unread: deque[StreamEntry] = deque()
        self._events: list[tuple[str, str, str, str, int]] = []  # lifecycle events not yet written
        self._closed = False

    @property
    def node_id(self) -> str:
        if self._info is None:
            raise SchedulerClosedError("node agent is not started")
        return self._info.node_id

    @property
    def info(self) -> NodeInfo:
        if self._info is None:
            raise SchedulerClosedError("node agent is not started")
        return self._info

    # --- lifecycle ------------------------------------------------------------------------------------
    async def start(self, node_info: NodeInfo) -> None:
        """Register (a fresh incarnation) and start heartbeating. Raises SchedulerConnectionError or
        RedisVersionError with a clear message when Redis is unusable."""
        check_id("node id", node_info.node_id)
        self._info = dataclasses.replace(
            node_info, incarnation=uuid.uuid4().hex[:16], started_ms=self._clock.time_ms()
        )
        self._info_payload = encode(self._info)
        self._client = make_client(self.config)
        await check_server(self._client, self.config)
        self._heartbeat_script = self._client.register_script(scripts.HEARTBEAT)
        self._deregister_script = self._client.register_script(scripts.DEREGISTER)
        self._dispatcher = Dispatcher(self._client, self.keys)
        await self._heartbeat()
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="node-heartbeat"),
            asyncio.create_task(self._control_loop(), name="node-control"),
        ]
        log.info(
            "node_registered",
            node_id=self._info.node_id,
            role=self._info.role,
            incarnation=self._info.incarnation,
        )

    async def close(self) -> None:
        """Deregister at once (frontends re-dispatch what we held) and disconnect."""
        self._closed = True
        await stop_tasks(
            self._tasks, grace_s=self.config.block_ms / 1000 + self.config.heartbeat_interval_s + 1
        )
        if self._client is not None and self._info is not None:
            try:
                await self._flush_events()
                await self._deregister_script(
                    keys=[self.keys.nodes, self.keys.heartbeat(self._info.node_id)],
                    args=[self._info.node_id, self._info.incarnation],
                )
            except REDIS_DOWN_ERRORS as exc:
                log.warning("deregister_failed", error=str(exc))
            await self._client.aclose()
        self._client = None

    # --- work -----------------------------------------------------------------------------------------------
    async def next_work(self) -> WorkItem:
        """Block until a runnable WorkItem arrives. Poison payloads go to the dead letters; items for an
        earlier incarnation, cancelled or expired ones are dropped (an expired one is answered
        ``expired``). Survives Redis outages (backs off and retries). Raises SchedulerClosedError."""
        backoff = ExponentialBackoff()
        while not self._closed:
            while self._unread:  # entries already taken from Redis (in our pending list)
                entry_id, fields = self._unread.popleft()
                item = await self._accept(entry_id, fields)
                if item is not None:
                    return item
            try:
                self._unread.extend(await self._read_work())
                backoff.reset()
            except REDIS_DOWN_ERRORS as exc:
                self.stats.inc("redis_errors")
                log.warning("work_read_failed", error=str(exc))
                await self._clock.sleep(backoff.next_delay_s())
                continue
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self.stats.inc("work_group_missing")  # Redis restarted: re-register, which recreates it
                await self._heartbeat_quietly()
                await self._clock.sleep(backoff.next_delay_s())
                continue
        raise SchedulerClosedError("node agent closed")

    async def _read_work(self) -> list[StreamEntry]:
        assert self._client is not None
        key = self.keys.work(self.node_id)
        start = "0" if self._read_pending else ">"
        answer = await self._client.xreadgroup(
            WORK_GROUP,
            self.node_id,
            {key: start},
            count=16,
            block=None if self._read_pending else self.config.block_ms,
        )
        entries = stream_entries(answer)
        if self._read_pending and not entries:
            self._read_pending = False
        return entries

    async def _accept(self, entry_id: bytes, fields: dict[bytes, bytes] | None) -> WorkItem | None:
        payload = (fields or {}).get(b"m")
        if payload is None:  # deleted while pending (the frontend re-dispatched it)
            await self._drop(entry_id)
            return None
        try:
            item: WorkItem = decode(payload, WorkItem)
        except MessageDecodeError as exc:
            await self._dead_letter("work:" + self.node_id, str(exc), payload)
            await self._drop(entry_id)
            return None
        reason = self._drop_reason(item)
        if reason is not None:
            self.stats.inc("dropped_" + reason)
            log.info("work_dropped", req_id=item.req_id, reason=reason, attempt=item.attempt)
            if reason == "expired":
                await self._publish_quietly(item, Expired(req_id=item.req_id, attempt=item.attempt))
            await self._drop(entry_id)
            return None
        self._held[(item.req_id, item.attempt)] = _Held(entry_id, item)
        self.stats.inc("work_received")
        await self.mark(item.req_id, "received", detail=f"attempt={item.attempt}")
        return item

    def _drop_reason(self, item: WorkItem) -> str | None:
        if item.assignment.decode_incarnation != self.info.incarnation:
            return "stale_incarnation"  # sent to our previous life; its frontend re-dispatches it
        if self._cancelled.get(item.req_id, -1) >= item.attempt:
            return "cancelled"
        if self._clock.time_ms() >= item.deadline_ms:
            return "expired"
        return None

    async def _drop(self, entry_id: bytes) -> None:
        assert self._client is not None
        key = self.keys.work(self.node_id)
        pipe = self._client.pipeline(transaction=False)
        pipe.xack(key, WORK_GROUP, entry_id)
        pipe.xdel(key, entry_id)
        await pipe.execute()

    async def ack(self, work: WorkItem) -> None:
        """The request is done here (terminal published, or dropped after a cancel): remove it from the
        work stream and release its decode booking (and prefill booking on a mixed node). One round trip."""
        held = self._held.pop((work.req_id, work.attempt), None)
        if held is None:
            raise UnknownRequestError(
                f"ack of {work.req_id}, which this node does not hold", req_id=work.req_id
            )
        if not held.terminal_sent and not self.is_cancelled(work.req_id, work.attempt):
            # Acked without an answer: tell the frontend (it re-dispatches) instead of leaving it to the TTL.
            self.stats.inc("acked_without_terminal")
            log.warning("acked_without_terminal", req_id=work.req_id, attempt=work.attempt)
            await self._publish_quietly(
                work,
                Failed(
                    req_id=work.req_id,
                    attempt=work.attempt,
                    code="dropped_by_node",
                    message=f"node {self.node_id} gave the request up",
                    retryable=True,
                ),
            )
        now = self._clock.time_ms()
        key = self.keys.work(self.node_id)

        async def send() -> None:
            assert self._client is not None
            pipe = self._client.pipeline(transaction=False)
            self._drain_events(pipe)
            pipe.xack(key, WORK_GROUP, held.entry_id)
            pipe.xdel(key, held.entry_id)
            await self._dispatcher.queue_release(pipe, work.req_id, "dbook", node_id=self.node_id, now_ms=now)
            if work.assignment.mode == "mixed":
                await self._dispatcher.queue_release(
                    pipe, work.req_id, "pbook", node_id=self.node_id, now_ms=now
                )
            await pipe.execute()

        await self._with_retry("ack", send)

    async def release_prefill(self, req_id: str, *, prefill_node_id: str | None = None) -> int:
        """Prefill (and KV send) of ``req_id`` is done: release its queued-prefill-token booking and
        record ``prefilled`` (one round trip). Called by the prefill node (``prefill_node_id`` lets a
        decode-side simulator release on its peer's behalf). Returns the tokens released (0 if already)."""
        node = prefill_node_id or self.node_id
        now = self._clock.time_ms()

        async def send() -> int:
            assert self._client is not None
            pipe = self._client.pipeline(transaction=False)
            await self._dispatcher.queue_release(
                pipe, req_id, "pbook", node_id=node, state="prefilled", now_ms=now
            )
            add_event(pipe, self.keys, req_id, "prefilled", node=node, now_ms=now, ttl_ms=self.config.ttl_ms)
            self._drain_events(pipe)
            released, *_ = await pipe.execute()
            return int(released or 0)

        return await self._with_retry("release_prefill", send)

    # --- results and lifecycle records ---------------------------------------------------------------
    async def publish(self, result: ResultMessage, *, frontend_id: str | None = None) -> None:
        """Send a result to the frontend that submitted the request (from the held WorkItem unless
        ``frontend_id`` is given). Retries through Redis blips for up to the dead-after time, then raises
        SchedulerConnectionError: the frontend will have re-dispatched by then, so drop the request."""
        fe = frontend_id or self._held_item(result.req_id, result.attempt).frontend_id
        key = self.keys.results(fe)

        async def send() -> None:
            assert self._client is not None
            pipe = self._client.pipeline(transaction=False)
            self._drain_events(pipe)
            pipe.xadd(key, {"m": encode(result)}, maxlen=self.config.stream_maxlen, approximate=True)
            pipe.pexpire(key, self.config.ttl_ms)
            await pipe.execute()

        await self._with_retry("publish", send)
        held = self._held.get((result.req_id, result.attempt))
        if held is not None and result.is_terminal:
            held.terminal_sent = True
        if result.is_terminal:
            self.stats.inc("published_" + result.TYPE)

    async def mark(self, req_id: str, event: str, *, detail: str = "", node: str | None = None) -> None:
        """Record a lifecycle event (prefilled, transferred, decoding, ...). No I/O here: events ride
        along with this node's next publish/ack/release pipeline (or heartbeat), in order. Never raises."""
        if self._info is None:
            return
        self._events.append((req_id, event, node or self._info.node_id, detail, self._clock.time_ms()))
        if len(self._events) > 10_000:  # Redis away for long: keep the newest
            del self._events[:1000]
            self.stats.inc("events_dropped", 1000)

    def _drain_events(self, pipe: Pipeline) -> None:
        for req_id, event, node, detail, ts_ms in self._events:
            add_event(
                pipe,
                self.keys,
                req_id,
                event,
                node=node,
                now_ms=ts_ms,
                ttl_ms=self.config.ttl_ms,
                detail=detail,
            )
        self._events.clear()

    async def _flush_events(self) -> None:
        if not self._events or self._client is None:
            return
        pipe = self._client.pipeline(transaction=False)
        self._drain_events(pipe)
        await pipe.execute()

    def holds(self, req_id: str) -> bool:
        return any(key[0] == req_id for key in self._held)

    def _held_item(self, req_id: str, attempt: int) -> WorkItem:
        held = self._held.get((req_id, attempt))
        if held is None:
            raise UnknownRequestError(
                f"{req_id} attempt {attempt} is not held by this node; pass frontend_id", req_id=req_id
            )
        return held.item

    async def _publish_quietly(self, item: WorkItem, result: ResultMessage) -> None:
        try:
            await self.publish(result, frontend_id=item.frontend_id)
        except SchedulerConnectionError as exc:
            log.warning("publish_failed", req_id=item.req_id, error=str(exc))

    # --- cancellations --------------------------------------------------------------------------------
    async def cancellations(self) -> AsyncIterator[CancelMessage]:
        """Every CancelMessage sent to this node (for requests it runs, as D or as P). One consumer."""
        while not self._closed:
            yield await self._cancel_queue.get()

    def is_cancelled(self, req_id: str, attempt: int) -> bool:
        return self._cancelled.get(req_id, -1) >= attempt

    async def _control_loop(self) -> None:
        backoff = ExponentialBackoff()
        key = self.keys.control(self.node_id)
        last_id: bytes | str = "0-0"
        while not self._closed:
            try:
                assert self._client is not None
                answer = await self._client.xread({key: last_id}, count=256, block=self.config.block_ms)
                entries = stream_entries(answer)
                for entry_id, fields in entries:
                    await self._on_control(fields.get(b"m", b""))
                    last_id = entry_id
                if entries:
                    await self._client.xtrim(key, minid=last_id)
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN_ERRORS as exc:
                self.stats.inc("redis_errors")
                log.warning("control_read_failed", error=str(exc))
                last_id = "0-0"  # a restarted Redis numbers entries afresh
                await self._clock.sleep(backoff.next_delay_s())
            except Exception:
                self.stats.inc("control_loop_errors")
                log.exception("control_loop_error")
                await self._clock.sleep(backoff.next_delay_s())

    async def _on_control(self, payload: bytes) -> None:
        try:
            msg: CancelMessage = decode(payload, CancelMessage)
        except MessageDecodeError as exc:
            await self._dead_letter("ctl:" + self.node_id, str(exc), payload)
            return
        self._remember_cancel(msg)
        self.stats.inc("cancels_received")
        try:
            self._cancel_queue.put_nowait(msg)
        except asyncio.QueueFull:
            self.stats.inc("cancel_queue_full")
            log.error("cancel_queue_full", req_id=msg.req_id)

    def _remember_cancel(self, msg: CancelMessage) -> None:
        self._cancelled[msg.req_id] = max(msg.attempt, self._cancelled.get(msg.req_id, -1))
        while len(self._cancelled) > 100_000:  # oldest first (dict order): the set stays bounded
            self._cancelled.pop(next(iter(self._cancelled)))

    # --- heartbeat ------------------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        assert self._client is not None and self._info is not None
        load = self._load_provider()
        fields: list[str | int] = [v for pair in load.to_fields().items() for v in pair]
        node_id = self._info.node_id
        registered = await self._heartbeat_script(
            keys=[
                self.keys.nodes,
                self.keys.heartbeat(node_id),
                self.keys.work(node_id),
                self.keys.control(node_id),
            ],
            args=[
                node_id,
                self._info_payload,
                self._info.incarnation,
                self._clock.time_ms(),
                self.config.dead_after_ms,
                self.config.ttl_ms,
                WORK_GROUP,
                *fields,
            ],
        )
        if registered and self._tasks:
            self.stats.inc("reregistered")
            log.warning("node_reregistered", node_id=node_id)

    async def _heartbeat_quietly(self) -> None:
        try:
            await self._heartbeat()
        except REDIS_DOWN_ERRORS as exc:
            self.stats.inc("redis_errors")
            log.warning("heartbeat_failed", error=str(exc))

    async def _heartbeat_loop(self) -> None:
        backoff = ExponentialBackoff(cap_s=self.config.heartbeat_interval_s)
        while not self._closed:
            try:
                await self._clock.sleep(self.config.heartbeat_interval_s)
                if not self._closed:
                    await self._heartbeat()
                    await self._flush_events()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN_ERRORS as exc:
                self.stats.inc("redis_errors")
                log.warning("heartbeat_failed", error=str(exc))
                await self._clock.sleep(backoff.next_delay_s())
            except Exception:
                self.stats.inc("heartbeat_loop_errors")
                log.exception("heartbeat_loop_error")
                await self._clock.sleep(backoff.next_delay_s())

    # --- helpers ------------------------------------------------------------------------------------------
    async def _with_retry(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op()`` through Redis blips for up to the dead-after time, then raise
        SchedulerConnectionError (by then the frontend treats this node as gone and re-dispatches)."""
        backoff = ExponentialBackoff()
        give_up_at = self._clock.monotonic() + self.config.dead_after_ms / 1000
        while True:
            try:
                return await op()
            except REDIS_DOWN_ERRORS as exc:
                self.stats.inc("redis_errors")
                if self._clock.monotonic() >= give_up_at:
                    raise SchedulerConnectionError(f"{what}: Redis unavailable: {exc}") from None
                log.warning("redis_retry", op=what, error=str(exc))
                await self._clock.sleep(backoff.next_delay_s())

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
