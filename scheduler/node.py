"""Node side: runs in every instance, next to the engine loop.

  start(info) -> heartbeat thread (lease, load, frontend leases) + reader (work and control streams
                 in one blocking XREAD) + a periodic task (load snapshot, records without a frontend)
  engine loop: next_work() -> run it -> publish() per token chunk -> terminal -> ack()
  cancellations(): CancelMessages for this node (client gone, expired, re-dispatched elsewhere, and
                   ``frontend_lost`` when the accepting frontend's lease stayed lapsed for a lease)

Writes go through the ``Outbox`` (one pipeline per flush, shared by concurrent requests). A node
that crashes loses nothing the cluster needs: its frontends re-dispatch what it held.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial

import redis
import redis.asyncio as aioredis

from scheduler.clock import SYSTEM_CLOCK, Clock
from scheduler.config import SchedulerConfig
from scheduler.connection import after_id, check_server, make_client
from scheduler.errors import SchedulerClosedError, UnknownRequestError
from scheduler.heartbeat import Heartbeater
from scheduler.keys import ROLE_LETTERS, KeySchema, check_id, group_id
from scheduler.lease import LeaseWatch, ServerClock
from scheduler.messages import (
    CancelMessage,
    DrainRequest,
    Expired,
    Failed,
    LoadReport,
    Migrated,
    NodeEvent,
    NodeInfo,
    ResultMessage,
    RoleChangeRequest,
    WorkItem,
    encode,
)
from scheduler.metrics import Counters
from scheduler.node_commands import NodeCommands
from scheduler.node_lifecycle import NodeLifecycle
from scheduler.node_migration import NodeMigration
from scheduler.node_record import BeatArgs, BeatSnapshot, HeldWork, drop_reason, full_beat
from scheduler.node_streams import NodeReader
from scheduler.outbox import Outbox
from scheduler.poison import Repairer, node_key_types
from scheduler.records import record_line
from scheduler.retry import Retrier
from scheduler.states import NODE_TRANSITIONS, NodeState, transition
from splitwise.codes import FailureCode
from splitwise.logging import get_logger

log = get_logger("scheduler.node")

LoadProvider = Callable[[], LoadReport]
# The heartbeat reads the server clock (TIME) on every this-many beats; in between, the lease is
# computed from the local clock plus the measured offset (drift over a few seconds is negligible).
TIME_EVERY_BEATS = 10
# Events after which a disaggregated request's prompt tokens are no longer queued on its P.
_PREFILL_DONE_EVENTS = frozenset({"transferred", "decoding"})


class NodeAgent(NodeLifecycle, NodeMigration):
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
        self._retrier = Retrier(clock, self.stats)
        self._client: aioredis.Redis | None = None
        self._info: NodeInfo | None = None
        self._info_payload = b""
        self._member = ""
        self._held: dict[tuple[str, int], HeldWork] = {}  # (req_id, attempt): a node may hold two attempts
        self._cancelled: dict[str, int] = {}  # req_id -> highest cancelled attempt (bounded)
        self._cancel_queue: asyncio.Queue[CancelMessage] = asyncio.Queue(maxsize=10_000)
        self._tasks: list[asyncio.Task[None]] = []
        self._snapshot = BeatSnapshot()
        self._last_load_sent: LoadReport | None = None  # heartbeat thread only
        self._last_trimmed = ("", "")  # heartbeat thread only
        self._frontend_leases = LeaseWatch(grace_ms=config.dead_after_ms)
        self._server_clock = ServerClock(clock)  # written by the heartbeat thread only
        self._beats_per_refresh = max(1, int(config.scheduler_ttl_s / (10 * config.heartbeat_interval_s)))
        self._closed = False
        self._deregistered = False  # deregister() ran: close() does not run the script again
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: Outbox | None = None
        self._reader: NodeReader | None = None
        self._heartbeater: Heartbeater | None = None
        self.commands = NodeCommands(self.stats)  # drain / role change orders (scheduler.node_commands)

    @property
    def node_id(self) -> str:
        return self.info.node_id

    @property
    def info(self) -> NodeInfo:
        if self._info is None:
            raise SchedulerClosedError("node agent is not started")
        return self._info

    @property
    def heartbeater(self) -> Heartbeater:
        assert self._heartbeater is not None, "node agent is not started"
        return self._heartbeater

    def _candidates_key(self) -> str:
        info = self.info
        return self.keys.candidates(group_id(info.model_id, info.kv.compat_key), ROLE_LETTERS[info.role])

    # --- lifecycle ------------------------------------------------------------------------------------
    async def start(self, node_info: NodeInfo) -> None:
        """Register (a fresh incarnation) and start heartbeating. Raises SchedulerConnectionError or
        RedisVersionError with a clear message when Redis is unusable."""
        check_id("node id", node_info.node_id)
        self._info = dataclasses.replace(
            node_info, incarnation=uuid.uuid4().hex[:16], started_ms=self._clock.time_ms()
        )
        self._info_payload = encode(self._info)
        self._member = f"{self._info.node_id}|{self._info.incarnation}"
        self._loop = asyncio.get_running_loop()
        self._client = make_client(self.config)
        await check_server(self._client, self.config)
        self._outbox = Outbox(self._client, self.keys, self.config, self._retrier)
        self._reader = NodeReader(self._client, self.keys, self.node_id, self.config, self.stats, self._clock)
        self._snapshot = BeatSnapshot(load=self._load_provider())
        types = partial(node_key_types, self.keys, self.node_id, self._candidates_key())
        repairer = Repairer(self.keys, self.config, self.stats, types, who=self.node_id, rejoin=self._member)
        self._retrier.repair = partial(repairer.run, self._client)  # poison keys (scheduler.poison)
        beat = repairer.guard(self._beat)
        self._heartbeater = Heartbeater(f"node-heartbeat-{self.node_id}", self.config, self._retrier, beat)
        await self._heartbeater.start()
        self._tasks = [
            asyncio.create_task(
                self._retrier.loop("node_reader", self._read_once, running=self._running), name="node-reader"
            ),
            asyncio.create_task(
                self._retrier.loop("node_periodic", self._periodic_once, running=self._running),
                name="node-periodic",
            ),
        ]
        log.info(
            "node_registered", node_id=self.node_id, role=self._info.role, incarnation=self._info.incarnation
        )

    def _running(self) -> bool:
        return not self._closed

    async def close(self) -> None:
        """End the lease at once (frontends re-dispatch what we held) and disconnect."""
        if self._closed:
            return
        self._closed = True
        from scheduler.tasks import stop_tasks

        # The reader blocks for long idle reads: cancel it at once (the client is closed right after).
        await stop_tasks(self._tasks, grace_s=0.0)
        if self._heartbeater is not None:
            await self._heartbeater.stop()
        if self._client is not None and self._info is not None:
            try:
                if self._outbox is not None and self._outbox.has_pending:
                    await self._outbox.flush()
                if not self._deregistered:
                    await self._deregister_script()
            except Exception as exc:  # noqa: BLE001 - best effort: the lease lapses anyway
                log.warning("deregister_failed", error=str(exc))
            await self._client.aclose()
        self._client = None
        if self._reader is not None:
            self._reader.close()

    # --- work -------------------------------------------------------------------------------------------
    async def next_work(self) -> WorkItem:
        """Block until a runnable WorkItem arrives. Poison payloads go to the dead letters; items for an
        earlier incarnation, cancelled or expired ones are dropped (an expired one is answered
        ``expired``). Survives Redis outages. Raises SchedulerClosedError."""
        if self._reader is None:
            raise SchedulerClosedError("node agent is not started")
        while not self._closed:
            item = await self._reader.next_item()
            if item is None:
                break
            if self._accept(item):
                return item
        raise SchedulerClosedError("node agent closed")

    def _accept(self, item: WorkItem) -> bool:
        reason = drop_reason(
            item, self.info.incarnation, self._cancelled.get(item.req_id, -1), self._clock.time_ms()
        )
        if reason is not None:
            self.stats.inc("dropped_" + reason)
            log.info("work_dropped", req_id=item.req_id, reason=reason, attempt=item.attempt)
            if reason == "expired":
                self._queue_result(item.frontend_id, Expired(req_id=item.req_id, attempt=item.attempt))
            return False
        self._held[(item.req_id, item.attempt)] = HeldWork(item)
        self.stats.inc("work_received")
        self._queue_event(item, "received", f"attempt={item.attempt}")
        self._publish_snapshot()
        return True

    async def ack(self, work: WorkItem) -> None:
        """The request is done here (terminal published, or dropped after a cancel): release its
        bookings. Terminal, releases and ack leave in one pipeline."""
        held = self._held.pop((work.req_id, work.attempt), None)
        if held is None:
            raise UnknownRequestError(
                f"ack of {work.req_id}, which this node does not hold", req_id=work.req_id
            )
        if held.state in (NodeState.RECEIVED, NodeState.RUNNING):
            # Acked without an answer: tell the frontend (it re-dispatches) instead of leaving it to the TTL.
            self.stats.inc("acked_without_terminal")
            log.warning("acked_without_terminal", req_id=work.req_id, attempt=work.attempt)
            self._queue_result(
                work.frontend_id,
                Failed(
                    req_id=work.req_id,
                    attempt=work.attempt,
                    code=FailureCode.DROPPED_BY_NODE,
                    message=f"node {self.node_id} gave the request up",
                    retryable=True,
                ),
            )
        for member in work.assignment.bookings:
            if member not in held.released:
                self._queue_release(work, member)
        self._publish_snapshot()
        assert self._outbox is not None
        await self._outbox.flush()

    async def release_prefill(self, req_id: str, *, prefill_node_id: str | None = None) -> int:
        """Prefill (and KV send) of ``req_id`` is done. The booking is released by the decode node that
        holds the request (when it marks ``transferred``/``decoding``, or acks), and D records
        ``prefilled`` when P's KV landed, so on the prefill node this costs nothing (returns 0).
        Returns the prompt tokens released by this call."""
        held = [h for (rid, _a), h in self._held.items() if rid == req_id]
        if not held:
            return 0
        member = held[-1].item.assignment.booking("p")
        if member is None or member in held[-1].released:
            return 0
        held[-1].released.add(member)
        self._queue_release(held[-1].item, member)
        assert self._outbox is not None
        await self._outbox.flush()
        return int(member.rsplit("|", 1)[1])

    # --- results and lifecycle records ---------------------------------------------------------------
    async def publish(self, result: ResultMessage, *, frontend_id: str | None = None) -> None:
        """Send a result to the frontend that submitted the request. A token chunk is queued behind at
        most one flush in flight (``Outbox.send_soon``; a flush that failed after retrying through
        blips for the dead-after time raises SchedulerConnectionError here: the frontend will have
        re-dispatched by then); a terminal message is queued and leaves with the ``ack`` that must
        follow it."""
        held = self._held.get((result.req_id, result.attempt))
        if frontend_id is None:
            if held is None:
                raise UnknownRequestError(
                    f"{result.req_id} attempt {result.attempt} is not held by this node; pass frontend_id",
                    req_id=result.req_id,
                )
            frontend_id = held.item.frontend_id
        self._queue_result(frontend_id, result)
        if result.is_terminal:
            if held is not None:
                transition(held, NodeState.ANSWERED, NODE_TRANSITIONS, self.stats, why="terminal published")
            self.stats.inc("published_" + result.TYPE)
            return
        assert self._outbox is not None
        await self._outbox.send_soon()

    async def mark(self, req_id: str, event: str, *, detail: str = "", node: str | None = None) -> None:
        """Record a lifecycle event (prefilled, transferred, decoding, ...). No I/O here: it rides with
        this node's next write for the request. Never raises."""
        if self._info is None or self._outbox is None:
            return
        held = [h for (rid, _a), h in self._held.items() if rid == req_id]
        if not held:
            self._queue_record(
                req_id, record_line(self._clock.time_ms(), event, node or self.node_id, detail)
            )
            return
        work = held[-1]
        assignment = work.item.assignment
        if event == "transferred" and assignment.mode == "disagg":
            # D learns P's prefill is done when its KV landed: the record shows it as P's event.
            self._queue_event(work.item, "prefilled", "", node=assignment.prefill_node_id)
        if event in _PREFILL_DONE_EVENTS and work.state is NodeState.RECEIVED:
            transition(work, NodeState.RUNNING, NODE_TRANSITIONS, self.stats, why=event)
            member = work.item.assignment.booking("p")
            if member is not None and member not in work.released:
                work.released.add(member)
                self._queue_release(work.item, member)
        self._queue_event(work.item, event, detail, node=node)

    def _queue_result(self, frontend_id: str, result: ResultMessage | NodeEvent | Migrated) -> None:
        assert self._outbox is not None
        self._outbox.put_result(frontend_id, encode(result))
        if result.is_terminal:
            self._outbox.schedule()

    def _queue_event(self, item: WorkItem, event: str, detail: str, *, node: str | None = None) -> None:
        self._queue_result(
            item.frontend_id,
            NodeEvent(
                req_id=item.req_id,
                attempt=item.attempt,
                event=event,
                node=node or self.node_id,
                detail=detail,
                ts_ms=self._clock.time_ms(),
            ),
        )

    def _queue_release(self, item: WorkItem, member: str) -> None:
        assert self._outbox is not None
        self._outbox.put_release(member, self.keys.candidates(item.assignment.group, member[0]))

    def _queue_record(self, req_id: str, line: str) -> None:
        assert self._outbox is not None
        self._outbox.put_record(req_id, line)

    def holds(self, req_id: str) -> bool:
        return any(key[0] == req_id for key in self._held)

    # --- cancellations --------------------------------------------------------------------------------
    async def cancellations(self) -> AsyncIterator[CancelMessage]:
        """Every CancelMessage for this node (for requests it runs, as D or as P). One consumer."""
        while not self._closed:
            yield await self._cancel_queue.get()

    def is_cancelled(self, req_id: str, attempt: int) -> bool:
        return self._cancelled.get(req_id, -1) >= attempt

    def _cancel(self, msg: CancelMessage, *, state: NodeState = NodeState.CANCELLED) -> None:
        self._cancelled[msg.req_id] = max(msg.attempt, self._cancelled.get(msg.req_id, -1))
        while len(self._cancelled) > 100_000:  # oldest first (dict order): the map stays bounded
            self._cancelled.pop(next(iter(self._cancelled)))
        for (rid, attempt), held in self._held.items():
            if (
                rid == msg.req_id
                and attempt <= msg.attempt
                and held.state in (NodeState.RECEIVED, NodeState.RUNNING)
            ):
                transition(held, state, NODE_TRANSITIONS, self.stats, why=msg.reason)
        try:
            self._cancel_queue.put_nowait(msg)
        except asyncio.QueueFull:
            self.stats.inc("cancel_queue_full")
            log.error("cancel_queue_full", req_id=msg.req_id)

    # --- background: reader, periodic, heartbeat -----------------------------------------------------
    async def _read_once(self) -> None:
        assert self._reader is not None
        for msg in await self._reader.read_once():
            if isinstance(msg, DrainRequest | RoleChangeRequest):
                self.commands.receive(msg, self.info.incarnation)
                continue
            if (cancel := self.cancel_or_queue_migration(msg)) is None:
                continue
            self.stats.inc("cancels_received")
            self._cancel(cancel)
        self._publish_snapshot()

    async def _periodic_once(self) -> None:
        await self._clock.sleep(self.config.heartbeat_interval_s)
        self._publish_snapshot(load=self._load_provider())
        if self._outbox is not None and self._outbox.has_pending:
            await self._outbox.flush()  # records of requests this node does not hold (a P's)

    def _publish_snapshot(self, *, load: LoadReport | None = None) -> None:
        reader = self._reader
        self._snapshot = BeatSnapshot(
            load=load or self._snapshot.load,
            frontend_ids=tuple(sorted({h.item.frontend_id for h in self._held.values()})),
            last_work_id=after_id(reader.last_work_id) if reader else "",
            last_control_id=after_id(reader.last_control_id) if reader else "",
        )

    def _beat(self, client: redis.Redis) -> None:
        """Heartbeat thread: extend the lease, report load, read the leases of our requests' frontends."""
        snap = self._snapshot
        first = self.heartbeater.num_beats == 0
        refresh = self.heartbeater.num_beats % self._beats_per_refresh == 0
        measure = self.heartbeater.num_beats % TIME_EVERY_BEATS == 0
        read = (snap.last_work_id, snap.last_control_id)
        flags = (
            ("r" if refresh else "")
            + ("l" if snap.load != self._last_load_sent else "")
            + ("t" if measure else "")
            + ("x" if read != self._last_trimmed else "")  # something was read: trim it
            + ("" if self.commands.status.is_candidate else "n")  # draining: stay out of dispatch
        )
        self._last_load_sent, self._last_trimmed = snap.load, read
        registered, expiry, measured = 0, 0, 0
        if not flags:
            # A steady beat is one round trip: extend the lease if the member is still there (XX CH
            # answers 0 when it is gone), check our stream and description exist, else run the script.
            expiry = self._server_clock.now_ms() + self.config.dead_after_ms
            pipe = client.pipeline(transaction=False)
            pipe.zadd(self.keys.alive, {self._member: expiry}, xx=True, ch=True)
            pipe.exists(self.keys.work(self.node_id)).hexists(self.keys.nodes, self.node_id)  # type: ignore[attr-defined]
            if not all(pipe.execute()):
                flags = "t"
        if flags:
            registered, expiry, measured = self._full_beat(client, snap, flags)
        leases = client.zmscore(self.keys.frontends, list(snap.frontend_ids)) if snap.frontend_ids else []
        if int(measured):
            self._server_clock.observe(int(measured))
        server_now = int(expiry) - self.config.dead_after_ms
        assert self._loop is not None
        if not snap.frontend_ids and not (registered and not first) and not self._frontend_leases.watching:
            return  # nothing for the loop to learn: do not wake it
        try:
            self._loop.call_soon_threadsafe(
                self._on_beat,
                bool(registered) and not first,
                server_now,
                dict(zip(snap.frontend_ids, leases, strict=True)),
            )
        except RuntimeError:  # the loop is closed: we are shutting down
            pass

    def _full_beat(self, client: redis.Redis, snap: BeatSnapshot, flags: str) -> tuple[int, int, int]:
        beat = BeatArgs(self.info, self._member, self._info_payload, self.commands.status.to_fields())
        return full_beat(client, self.keys, self.config, beat, snap, flags, self._server_clock.now_ms())

    def _on_beat(self, registered: bool, server_now_ms: int, leases: dict[str, float | None]) -> None:
        if registered:
            self.stats.inc("reregistered")
            log.warning("node_reregistered", node_id=self.node_id)
        self._frontend_leases.retain(set(leases))
        for frontend_id, expiry in leases.items():
            if self._frontend_leases.observe(
                frontend_id, expiry_ms=int(expiry) if expiry is not None else None, now_ms=server_now_ms
            ):
                self._abort_orphans(frontend_id)

    def _abort_orphans(self, frontend_id: str) -> None:
        """The frontend that accepted these requests is dead: nobody will read their results."""
        for held in list(self._held.values()):
            if held.item.frontend_id != frontend_id or held.state not in (
                NodeState.RECEIVED,
                NodeState.RUNNING,
            ):
                continue
            item = held.item
            self.stats.inc("orphans_aborted")
            log.warning("orphan_aborted", req_id=item.req_id, frontend_id=frontend_id)
            self._queue_record(
                item.req_id, record_line(self._clock.time_ms(), "orphaned", self.node_id, frontend_id)
            )
            self._cancel(
                CancelMessage(req_id=item.req_id, attempt=item.attempt, reason="frontend_lost"),
                state=NodeState.ORPHANED,
            )
            # A frontend whose lease only lapsed (a starved host) is still reading: tell it, so it
            # re-dispatches instead of waiting for the TTL; a dead one's stream is gone (NOMKSTREAM).
            message = "aborted by its node: the frontend's lease stayed lapsed for a whole lease"
            self._queue_result(
                frontend_id,
                Failed(
                    item.req_id, item.attempt, code=FailureCode.NODE_LOST, message=message, retryable=True
                ),
            )
        self._frontend_leases.forget(frontend_id)
