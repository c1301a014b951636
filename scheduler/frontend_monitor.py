"""The frontend's monitor: once per heartbeat interval, everything that depends on time or on other
participants' leases (the frontend's loop-side half; its lease itself is the heartbeat thread's).

    Redis lost its data? -> refresh the cluster view (dead letters, reaping) -> sweep expired
    bookings -> per request: expired? | Redis lost data -> re-dispatch | pending -> retry |
    its queued work item gone from the node's stream on two looks -> re-dispatch |
    node's lease lapsed and still lapsed an interval later -> re-dispatch
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis

from scheduler.connection import stream_id
from scheduler.dispatch import queue_release
from scheduler.frontend_record import FrontendRecord
from scheduler.lease import LeaseWatch
from scheduler.messages import Expired
from scheduler.registry import ClusterView
from scheduler.scripting import Batch
from scheduler.states import FrontendState
from splitwise.logging import get_logger

if TYPE_CHECKING:
    from scheduler.frontend import FrontendScheduler

log = get_logger("scheduler.frontend_monitor")

SWEEP_BATCH = 100


class Monitor:
    def __init__(self, fe: FrontendScheduler, client: aioredis.Redis, view: ClusterView, epoch: str) -> None:
        self._fe = fe
        self._client = client
        self._view = view
        self._epoch = epoch
        self._server = ""  # run_id of the server answering (one server or a Sentinel master)
        # A lapse must still be there one heartbeat interval later before work is re-dispatched.
        self._node_leases = LeaseWatch(grace_ms=int(fe.config.heartbeat_interval_s * 1000))
        # (req_id, attempt) of queued work items found missing from their stream at the last look.
        self._missing_once: set[tuple[str, int]] = set()

    async def tick(self) -> None:
        fe = self._fe
        await fe._clock.sleep(fe.config.heartbeat_interval_s)
        if not fe._running():
            return
        data_lost = fe.epoch_seen != self._epoch or fe.results_lost
        fe.results_lost = False
        server = await self._server_id()
        if server != self._server and self._server:
            # Another server answers (Sentinel failover, restart): writes of the last moments may be
            # lost, so every request starts over with its resume tokens (the old attempts are cancelled).
            log.warning("redis_server_changed", inflight=fe.num_inflight)
            fe.stats.inc("redis_failovers")
            data_lost = True
        self._server = server
        if fe.epoch_seen != self._epoch:
            # Queued work, bookings and our results stream are gone: every request starts over
            # (with its resume tokens) rather than waiting for results that will never come.
            log.warning("redis_lost_data", inflight=fe.num_inflight)
            fe.stats.inc("redis_restarts")
            self._epoch = fe.epoch_seen
            fe.restart_reading()
        await self.refresh_view()
        await self._sweep_bookings()
        await self._check_requests(data_lost=data_lost)

    async def _server_id(self) -> str:
        """The answering server's run_id ('' in Redis Cluster mode, where each shard has its own)."""
        if self._fe.config.scheduler_cluster:
            return ""
        info: Any = await self._client.info("server")
        return str(info.get("run_id", ""))

    async def _check_requests(self, *, data_lost: bool) -> None:
        fe = self._fe
        now = fe._clock.time_ms()
        server_now = fe.server_clock.now_ms()
        watched: set[str] = set()
        lost_streams, fe.lost_work_streams = fe.lost_work_streams, {}
        vanished = set() if data_lost else await self._vanished_work()
        for fl in list(fe.inflight.values()):
            if now >= fl.deadline_ms:
                await fe.finish(fl, Expired(req_id=fl.req_id, attempt=fl.attempt), notify_nodes="expired")
            elif fl.state is FrontendState.PENDING:
                await fe.retry_pending(fl)
            elif fl.assignment is None or fl.state is FrontendState.DISPATCHING:
                continue  # submit() is dispatching it right now
            elif data_lost:
                await fe.redispatch(fl, reason="Redis lost its data")
            elif (
                fl.assignment.decode_node_id in lost_streams
                and fl.state is FrontendState.QUEUED
                and fl.entry_id is not None
                and stream_id(fl.entry_id) < lost_streams[fl.assignment.decode_node_id]
                and not fl.is_received()
            ):
                await fe.redispatch(fl, reason=f"work stream of {fl.assignment.decode_node_id} was deleted")
            elif (
                (fl.req_id, fl.attempt) in vanished
                and fl.state is FrontendState.QUEUED
                and not fl.is_received()
            ):
                node_id = fl.assignment.decode_node_id
                fe.stats.inc("work_items_lost")
                log.warning("work_item_lost", req_id=fl.req_id, attempt=fl.attempt, node_id=node_id)
                await fe.redispatch(
                    fl, reason=f"work item gone from the work stream of {node_id} (deleted or trimmed)"
                )
            else:
                lost = self._lost_node(fl, server_now, watched)
                if lost is not None:
                    await fe.redispatch(fl, reason=f"node {lost} lost (lease lapsed)")
        self._node_leases.retain(watched)

    async def _vanished_work(self) -> set[tuple[str, int]]:
        """Queued requests whose work item is neither in their node's work stream nor below the
        node's read position (``work_read`` of its heartbeat hash, written with each trim of what it
        read) on this look and the last one: the stream was deleted (by an operator, or repaired as
        poison, and maybe re-created since by the node's heartbeat) or trimmed before the node read
        it. Two looks an interval apart: a stream deleted after the node read an item but before its
        beat recorded that would otherwise look the same (a false loss costs a re-dispatch, never a
        second run: the old attempt is cancelled). One pipeline for all of them."""
        fe = self._fe
        queued = [
            fl
            for fl in fe.inflight.values()
            if fl.state is FrontendState.QUEUED
            and fl.assignment is not None
            and fl.entry_id is not None
            and not fl.is_received()
        ]
        if not queued:
            self._missing_once = set()
            return set()
        pipe = self._client.pipeline(transaction=False)
        for fl in queued:
            assert fl.assignment is not None and fl.entry_id is not None
            pipe.xrange(fe.keys.work(fl.assignment.decode_node_id), fl.entry_id, fl.entry_id, count=1)
            pipe.hget(fe.keys.heartbeat(fl.assignment.decode_node_id), "work_read")
        answers = await pipe.execute(raise_on_error=False)
        missing = set()
        for i, fl in enumerate(queued):
            assert fl.entry_id is not None
            found, read = answers[2 * i], answers[2 * i + 1]
            # An error (a key of the wrong type: poison) means the item is not there either.
            if found and not isinstance(found, Exception):
                continue
            if isinstance(read, bytes) and _is_stream_id(read) and stream_id(fl.entry_id) < stream_id(read):
                continue  # trimmed because the node read it (it holds it, or its received is on the way)
            missing.add((fl.req_id, fl.attempt))
        confirmed = missing & self._missing_once
        self._missing_once = missing - confirmed
        return confirmed

    def _lost_node(self, fl: FrontendRecord, server_now: int, watched: set[str]) -> str | None:
        """The node of ``fl`` whose lease lapsed and stayed lapsed for the grace period, if any."""
        a = fl.assignment
        assert a is not None
        # Only the node holding the work item: D-first, the decode node handles a lost or stopped
        # prefill node itself (its transfer timeout or the lost control connection ends the hand-off,
        # then --pd-fallback). A re-dispatch here would race D's fallback, and with no other prefill
        # node fail a request D was about to serve.
        needed = [(a.decode_node_id, a.decode_incarnation)]
        for node_id, incarnation in needed:
            who = f"{node_id}|{incarnation}"
            watched.add(who)
            if self._node_leases.observe(
                who, expiry_ms=self._view.lease_of(node_id, incarnation), now_ms=server_now
            ):
                return node_id
        return None

    async def refresh_view(self) -> None:
        fe = self._fe
        for node_id, reason in (await self._view.refresh()).items():
            payload: bytes = await self._client.hget(fe.keys.nodes, node_id) or b""  # type: ignore[assignment]
            await self._client.hdel(fe.keys.nodes, node_id)
            await self._client.zrem(fe.keys.alive, *self._view.members_of(node_id))
            await fe.dead_letter("nodes:" + node_id, reason, payload)
        await self._reap_dead_nodes()

    async def _reap_dead_nodes(self) -> None:
        """Forget nodes whose lease lapsed a whole TTL ago, so node churn cannot grow the registry.
        (A node that comes back re-registers on its next heartbeat.)"""
        fe = self._fe
        members = self._view.expired_members(fe.server_clock.now_ms() - fe.config.ttl_ms)
        if not members:
            return
        pipe = self._client.pipeline(transaction=False)
        pipe.zrem(fe.keys.alive, *members)
        pipe.hdel(fe.keys.nodes, *(m.split("|", 1)[0] for m in members))
        await pipe.execute()
        fe.stats.inc("nodes_reaped", len(members))
        log.info("nodes_reaped", members=members)

    async def _sweep_bookings(self) -> None:
        """Release bookings whose request deadline passed (their releaser crashed)."""
        fe = self._fe
        expired: list[Any] = await self._client.zrangebyscore(
            fe.keys.bookings, "-inf", fe.server_clock.now_ms(), start=0, num=SWEEP_BATCH
        )
        members = [bytes(m).decode() for m in expired if m != b"~"]
        if not members:
            return
        batch = Batch(self._client)
        queue_release(batch, fe.keys, members)
        released = (await batch.execute())[0]
        fe.stats.inc("bookings_expired", len(members))
        log.warning("bookings_expired", count=len(members), released=int(released or 0))


def _is_stream_id(raw: bytes) -> bool:
    millis, sep, seq = raw.partition(b"-")
    return millis.isdigit() and (not sep or seq.isdigit())
