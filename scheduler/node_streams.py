"""A node's one blocking reader: its work stream and its control stream in a single XREAD.

Work entries become WorkItems (queued for ``next_work``); control entries become CancelMessages
and node commands (drain, role change).
Undecodable payloads go to the dead letters and reading goes on. Read positions are published to
the heartbeat, which trims what was read (once per beat, not per request).
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from scheduler.clock import Clock
from scheduler.config import SchedulerConfig
from scheduler.errors import MessageDecodeError
from scheduler.keys import KeySchema
from scheduler.messages import CONTROL_TYPES, CancelMessage, NodeCommand, WorkItem, decode
from scheduler.metrics import Counters
from scheduler.records import write_dead_letter

# A node's read wakes up for work or cancels at once; when idle it re-issues its read only every
# IDLE_BLOCK_FACTOR x block_ms (the client's socket timeout leaves 5 s of margin above that).
IDLE_BLOCK_FACTOR = 4


class NodeReader:
    def __init__(
        self,
        client: aioredis.Redis,
        keys: KeySchema,
        node_id: str,
        config: SchedulerConfig,
        stats: Counters,
        clock: Clock,
    ) -> None:
        self._client = client
        self._keys = keys
        self._node_id = node_id
        self._config = config
        self._stats = stats
        self._clock = clock
        self._work_key = keys.work(node_id)
        self._control_key = keys.control(node_id)
        # From the start: entries sent to an earlier incarnation are read and dropped as stale.
        self.last_work_id = "0-0"
        self.last_control_id = "0-0"
        self._items: asyncio.Queue[WorkItem | None] = asyncio.Queue()

    async def next_item(self) -> WorkItem | None:
        """The next work item read (None once closed)."""
        return await self._items.get()

    def close(self) -> None:
        self._items.put_nowait(None)

    async def read_once(self) -> list[CancelMessage | NodeCommand]:
        """One blocking XREAD of both streams; queues work items, returns the control messages."""
        answer = await self._client.xread(
            {self._work_key: self.last_work_id, self._control_key: self.last_control_id},
            count=64,
            block=self._config.block_ms * IDLE_BLOCK_FACTOR,
        )
        cancels: list[CancelMessage | NodeCommand] = []
        streams: list[Any] = list(answer or [])
        for stream, entries in streams:
            is_work = (stream.decode() if isinstance(stream, bytes) else stream) == self._work_key
            for entry_id, fields in entries:
                entry = entry_id.decode()
                if is_work:
                    self.last_work_id = entry
                else:
                    self.last_control_id = entry
                payload = (fields or {}).get(b"m")
                if payload is None:
                    continue  # the stream's creation marker
                try:
                    if is_work:
                        self._items.put_nowait(decode(payload, WorkItem))
                    else:
                        cancels.append(decode(payload, CONTROL_TYPES))
                except MessageDecodeError as exc:
                    source = ("work:" if is_work else "ctl:") + self._node_id
                    await write_dead_letter(
                        self._client,
                        self._keys,
                        self._config,
                        self._stats,
                        self._clock,
                        source,
                        str(exc),
                        payload,
                    )
        return cancels
