"""The node agent's part of a live migration (a mixin of ``NodeAgent``, kept apart for size).

Source node: ``hand_off`` then ``ack`` (bookings released, no terminal). Target node: ``adopt``
(held as RUNNING, ``Migrated`` to the frontend ahead of its tokens). ``flush`` lets the source
put its last tokens in Redis before the target publishes any. ``migrate_commands`` yields what
``splitwise migrate`` sent to this node's control stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from scheduler.errors import SchedulerClosedError
from scheduler.keys import KeySchema
from scheduler.messages import (
    CancelMessage,
    LoadReport,
    MigrateCommand,
    Migrated,
    NodeEvent,
    NodeInfo,
    ResultMessage,
    WorkItem,
)
from scheduler.metrics import Counters
from scheduler.migration import Peer, decode_peers
from scheduler.node_record import HeldWork
from scheduler.outbox import Outbox
from scheduler.states import NODE_TRANSITIONS, NodeState, transition


class NodeMigration:
    keys: KeySchema
    stats: Counters
    _held: dict[tuple[str, int], HeldWork]
    _client: aioredis.Redis | None
    _outbox: Outbox | None
    _closed: bool

    if TYPE_CHECKING:

        @property
        def info(self) -> NodeInfo: ...
        def _queue_result(self, frontend_id: str, result: ResultMessage | NodeEvent | Migrated) -> None: ...
        def _queue_event(
            self, item: WorkItem, event: str, detail: str, *, node: str | None = None
        ) -> None: ...
        def _publish_snapshot(self, *, load: LoadReport | None = None) -> None: ...

    def adopt(self, item: WorkItem, *, from_node: str, reason: str) -> WorkItem:
        """Take over a request another node migrated here: hold it as RUNNING under this node's id
        and incarnation, without bookings (the source released its own), and tell its frontend
        (``Migrated``, ahead of every token this node publishes for it). Returns the item as held."""
        info = self.info
        assignment = dataclasses.replace(
            item.assignment, decode_node_id=info.node_id, decode_incarnation=info.incarnation, bookings=[]
        )
        held = HeldWork(dataclasses.replace(item, assignment=assignment), state=NodeState.RUNNING)
        self._held[(item.req_id, item.attempt)] = held
        self.stats.inc("migrations_adopted")
        message = Migrated(
            req_id=item.req_id,
            attempt=item.attempt,
            from_node_id=from_node,
            decode_node_id=info.node_id,
            decode_incarnation=info.incarnation,
            reason=reason,
        )
        self._queue_result(item.frontend_id, message)
        self._queue_event(held.item, "migrated_in", f"from={from_node} reason={reason}")
        self._publish_snapshot()
        return held.item

    def hand_off(self, item: WorkItem, *, to_node: str) -> None:
        """A live migration committed: ``to_node`` answers for the request now. The ``ack`` that
        follows releases this node's bookings without any terminal of ours."""
        held = self._held.get((item.req_id, item.attempt))
        if held is not None:
            transition(held, NodeState.MIGRATED, NODE_TRANSITIONS, self.stats, why=f"migrated to {to_node}")
        self._queue_event(item, "migrated_out", f"to={to_node}")

    async def flush(self) -> None:
        """Return once everything queued so far (token chunks included) is in Redis."""
        if self._outbox is not None:
            await self._outbox.flush()

    async def migrate_commands(self) -> AsyncIterator[MigrateCommand]:
        """Every MigrateCommand sent to this node (``splitwise migrate``). One consumer."""
        while not self._closed:
            yield await self._migrations().get()

    def cancel_or_queue_migration(self, msg: CancelMessage | MigrateCommand) -> CancelMessage | None:
        """The reader's hook: a MigrateCommand is queued for ``migrate_commands`` (None); a cancel
        is returned for the agent to handle."""
        if isinstance(msg, CancelMessage):
            return msg
        self.stats.inc("migrate_commands_received")
        queue = self._migrations()
        if not queue.full():
            queue.put_nowait(msg)
        return None

    def _migrations(self) -> asyncio.Queue[MigrateCommand]:
        queue: asyncio.Queue[MigrateCommand] | None = getattr(self, "_migrate_queue", None)
        if queue is None:
            queue = asyncio.Queue(maxsize=1_000)
            self._migrate_queue = queue
        return queue

    async def decode_peers(self) -> list[Peer]:
        """Live decode nodes of this topic with their load (scheduler.migration.decode_peers)."""
        if self._client is None:
            raise SchedulerClosedError("node agent is not started")
        return await decode_peers(self._client, self.keys)
