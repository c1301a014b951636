"""Lua scripts loaded once, called with EVALSHA, and recovered after NOSCRIPT.

redis-py's ``Script`` sends ``SCRIPT EXISTS`` before every pipeline that holds a script (one extra
round trip per pipeline). We call ``EVALSHA`` directly and load a script only when the server says
NOSCRIPT (first use, Redis restarted, a Sentinel failover to a replica without the script cache).

``Batch`` is a pipeline that remembers how to rebuild each queued command, so a NOSCRIPT answer
re-runs only the script calls that failed (never the XADDs around them). On one server or a
Sentinel master it is sent on a pooled connection directly (pack all, send once, read each reply,
apply redis-py's reply parser): the same bytes as a redis-py pipeline for about half its client
CPU, which is most of what a node or a frontend spends per request. Redis Cluster clients (no
single pool) use redis-py's pipeline.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import ConnectionPool
from redis.commands.core import AsyncCoreCommands
from redis.exceptions import NoScriptError, ResponseError


@dataclass(frozen=True)
class LuaScript:
    name: str
    source: str

    @functools.cached_property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()

    def queue(self, pipe: Pipeline, keys: list[str], args: list[Any]) -> None:
        # execute_command: redis-py blocks its evalsha() wrapper in cluster pipelines, not the command
        # itself (all our keys share one slot, so the pipeline goes to one shard).
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    async def call(self, client: aioredis.Redis, keys: list[str], args: list[Any]) -> Any:
        pool = getattr(client, "connection_pool", None)
        if not isinstance(pool, ConnectionPool):  # Redis Cluster: redis-py routes by the keys
            try:
                return await client.evalsha(self.sha, len(keys), *keys, *args)
            except NoScriptError:
                await client.script_load(self.source)
                return await client.evalsha(self.sha, len(keys), *keys, *args)
        command: Command = (("EVALSHA", self.sha, len(keys), *keys, *args), {})
        (reply,) = await send_commands(client, pool, [command])
        if isinstance(reply, NoScriptError):
            # Load and call in one round trip (both replies are read: the connection stays in step).
            _loaded, reply = await send_commands(
                client, pool, [(("SCRIPT", "LOAD", self.source), {}), command]
            )
        if isinstance(reply, Exception):
            raise reply
        return reply

    def call_sync(self, client: redis.Redis, keys: list[str], args: list[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            client.script_load(self.source)
            return client.evalsha(self.sha, len(keys), *keys, *args)


QueuedOp = Callable[[Pipeline], object]
Command = tuple[tuple[Any, ...], dict[str, Any]]


class _Recorder(AsyncCoreCommands):
    """Stands in for a pipeline: redis-py's command methods build their arguments and call
    ``execute_command``, which only records them here."""

    _event_dispatcher: Any = None

    def __init__(self) -> None:
        self.commands: list[Command] = []

    def execute_command(self, *args: Any, **options: Any) -> _Recorder:
        self.commands.append((args, options))
        return self


async def send_commands(client: aioredis.Redis, pool: ConnectionPool, commands: list[Command]) -> list[Any]:
    """One round trip on one pooled connection; error replies are returned in place (like
    ``pipeline.execute(raise_on_error=False)``). A connection that failed mid-way is disconnected
    before it goes back to the pool, so no reply is ever read by the wrong caller."""
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        await conn.send_packed_command(conn.pack_commands([args for args, _ in commands]))
        replies: list[Any] = []
        callbacks = client.response_callbacks
        for args, options in commands:
            try:
                reply = await conn.read_response()
            except ResponseError as exc:
                replies.append(exc)
                continue
            callback = callbacks.get(args[0])
            if callback is not None:
                options = {k: v for k, v in options.items() if k != "keys"}
                reply = callback(reply, **options)
                if inspect.isawaitable(reply):
                    reply = await reply
            replies.append(reply)
        return replies
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)


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
        pool = getattr(self.client, "connection_pool", None)
        results: list[Any]
        if isinstance(pool, ConnectionPool):
            recorder = _Recorder()
            for op in self.ops:
                op(cast(Pipeline, recorder))
            results = await send_commands(self.client, pool, recorder.commands)
        else:  # Redis Cluster: redis-py routes the pipeline to the slot's shard
            pipe = self.client.pipeline(transaction=False)
            for op in self.ops:
                op(pipe)
            results = await pipe.execute(raise_on_error=False)
        for index, result in enumerate(results):
            if isinstance(result, NoScriptError) and index in self._scripts:
                script, keys, args = self._scripts[index]
                results[index] = await script.call(self.client, keys, args)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results
