"""Keeps this node's entry of the Redis prefix index current (KV-aware routing, #15).

    every 100 ms: take the prefix cache's changes (engine thread) -> publish them, if any

The engine thread owns the block pool; the loop reaches it only through ``EngineWorker.call``
between steps. A failed publish (Redis away) loses that delta, so the next one is a full snapshot.
"""

from __future__ import annotations

import asyncio

from scheduler.clock import SYSTEM_CLOCK, Clock
from scheduler.connection import REDIS_DOWN_ERRORS
from scheduler.prefix_index import PrefixIndexPublisher
from splitwise.counters import Counters
from splitwise.instance.engine_worker import EngineWorker
from splitwise.logging import get_logger

log = get_logger(__name__)

# Publishing often keeps the index close to the cache (a chat's next turn may follow within a
# second): a tick without changes costs one hop to the engine thread and nothing in Redis.
PUBLISH_INTERVAL_S = 0.1
_REFRESH_EVERY = 100  # ticks without a change after which the key's TTL is refreshed anyway


class PrefixIndexLoop:
    def __init__(
        self,
        worker: EngineWorker,
        publisher: PrefixIndexPublisher,
        counters: Counters,
        *,
        interval_s: float,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._worker = worker
        self._publisher = publisher
        self._counters = counters
        self._interval_s = interval_s
        self._clock = clock
        self._full = True
        self._idle = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="prefix-index")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self._publisher.clear()  # a graceful exit leaves no stale index behind
        except REDIS_DOWN_ERRORS:
            pass

    async def once(self) -> None:
        """One publish: the changes since the last one (or a snapshot), or a TTL refresh."""
        full = self._full
        changes, snapshot = await self._worker.call(lambda e: e.block_manager.take_cache_changes(full=full))
        self._idle = 0 if changes or snapshot is not None else self._idle + 1
        if not changes and snapshot is None and self._idle % _REFRESH_EVERY:
            return
        try:
            written = await self._publisher.publish(changes, snapshot)
        except REDIS_DOWN_ERRORS as exc:
            self._full = True
            self._counters.inc("prefix_index_errors")
            log.warning("prefix index publish failed; the next one is a snapshot", error=str(exc))
            return
        self._full = False
        self._counters.inc("prefix_index_hashes_published", written)

    async def _run(self) -> None:
        while True:
            await self.once()
            await self._clock.sleep(self._interval_s)
