"""Heartbeats from a dedicated thread with its own blocking Redis connection.

A busy event loop (a long engine step, a blocking call, a loaded machine) cannot starve liveness:
the thread only needs the GIL for a few microseconds per beat. The thread never touches loop-owned
state: it reads immutable snapshots the loop publishes (``Snapshot``) and posts what it learned
back with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import redis

from scheduler.config import SchedulerConfig
from scheduler.connection import make_sync_client
from scheduler.retry import Retrier
from splitwise.logging import get_logger

log = get_logger("scheduler.heartbeat")

Beat = Callable[[redis.Redis], None]


class Heartbeater:
    """Calls ``beat(client)`` every heartbeat interval on its own thread until ``stop()``."""

    def __init__(self, name: str, config: SchedulerConfig, retrier: Retrier, beat: Beat) -> None:
        self.name = name
        self._config = config
        self._retrier = retrier
        self._beat = beat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | None = None
        self.num_beats = 0

    async def start(self) -> None:
        """First beat now (errors propagate to the caller), then one per interval on the thread."""
        self._client = make_sync_client(self._config)
        await asyncio.to_thread(self.beat_once)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def beat_once(self) -> None:
        assert self._client is not None
        self._beat(self._client)
        self.num_beats += 1

    def _run(self) -> None:
        self._retrier.run_sync(
            self.name, self.beat_once, stop=self._stop, period_s=self._config.heartbeat_interval_s
        )

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, self._config.dead_after_ms / 1000 + 5)
            if self._thread.is_alive():
                log.error("heartbeat_thread_did_not_stop", name=self.name)
        if self._client is not None:
            self._client.close()
        self._thread, self._client = None, None
