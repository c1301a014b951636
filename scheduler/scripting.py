"""Lua scripts loaded once, called with EVALSHA, and recovered after NOSCRIPT.

redis-py's ``Script`` sends ``SCRIPT EXISTS`` before every pipeline that holds a script (one extra
round trip per pipeline). We call ``EVALSHA`` directly and load a script only when the server says
NOSCRIPT (first use, Redis restarted, a Sentinel failover to a replica without the script cache).

``Batch`` is a pipeline that remembers how to rebuild each queued command, so a NOSCRIPT answer
re-runs only the script calls that failed (never the XADDs around them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError


@dataclass(frozen=True)
class LuaScript:
    name: str
    source: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()

    def queue(self, pipe: Pipeline, keys: list[str], args: list[Any]) -> None:
        # execute_command: redis-py blocks its evalsha() wrapper in cluster pipelines, not the command
        # itself (all our keys share one slot, so the pipeline goes to one shard).
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    async def call(self, client: aioredis.Redis, keys: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)

    def call_sync(self, client: redis.Redis, keys: list[str], args: list[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            client.script_load(self.source)
            return client.evalsha(self.sha, len(keys), *keys, *args)


QueuedOp = Callable[[Pipeline], object]


@dataclass
class Batch:
    """Commands sent in one round trip. ``add`` queues any pipeline command; ``script`` a Lua call."""

    client: aioredis.Redis
    ops: list[QueuedOp] = field(default_factory=list)
    _scripts: dict[int, tuple[LuaScript, list[str], list[Any]]] = field(default_factory=dict)

    def add(self, op: QueuedOp) -> int:
        self.ops.append(op)
        return len(self.ops) - 1

    def script(self, script: LuaScript, keys: list[str], args: list[Any]) -> int:
        index = self.add(lambda pipe: script.queue(pipe, keys, args))
        self._scripts[index] = (script, keys, args)
        return index

    def __len__(self) -> int:
        return len(self.ops)

    async def execute(self) -> list[Any]:
        """Send everything; raises the first error other than a recovered NOSCRIPT."""
        if not self.ops:
            return []
        pipe = self.client.pipeline(transaction=False)
        for op in self.ops:
            op(pipe)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        for index, result in enumerate(results):
            if isinstance(result, NoScriptError) and index in self._scripts:
                script, keys, args = self._scripts[index]
                results[index] = await script.call(self.client, keys, args)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results
