"""Batch and LuaScript on a real redis-server: the direct send path parses replies exactly as
redis-py does, keeps the pooled connection in step after error replies, and recovers NOSCRIPT."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from scheduler_support import run

from scheduler.scripting import Batch, LuaScript
from splitwise.testing.redis_server import RedisServer

ECHO = LuaScript("echo", "return {KEYS[1], ARGV[1]}")


def test_batch_replies_match_redis_py_and_the_connection_stays_in_step(redis_server: RedisServer) -> None:
    async def body() -> None:
        client = aioredis.Redis(port=redis_server.port, max_connections=1)  # one connection: reused
        try:
            await client.xadd("s", {"m": b"one"})
            batch = Batch(client)
            batch.add(lambda pipe: pipe.set("k", "v"))
            batch.add(lambda pipe: pipe.xread({"s": "0-0"}, count=10))
            batch.script(ECHO, ["key"], ["arg"])
            got = await batch.execute()
            assert got[0] is True
            assert got[1] == await client.xread({"s": "0-0"}, count=10)  # redis-py's own parse
            assert got[2] == [b"key", b"arg"]

            bad = Batch(client)
            bad.add(lambda pipe: pipe.incr("k"))  # an error reply in the middle of the batch
            bad.add(lambda pipe: pipe.get("k"))
            with pytest.raises(ResponseError):
                await bad.execute()
            # Every reply of the failed batch was read: the next caller gets its own answer.
            assert await client.get("k") == b"v"
            assert await client.xlen("s") == 1
        finally:
            await client.aclose()

    run(body())


def test_script_call_recovers_after_the_script_cache_was_flushed(redis_server: RedisServer) -> None:
    async def body() -> None:
        client = aioredis.Redis(port=redis_server.port)
        try:
            assert await ECHO.call(client, ["a"], ["1"]) == [b"a", b"1"]
            await client.script_flush()
            assert await ECHO.call(client, ["b"], ["2"]) == [b"b", b"2"]
            await client.script_flush()
            batch = Batch(client)
            batch.add(lambda pipe: pipe.set("x", "1"))
            batch.script(ECHO, ["c"], ["3"])
            assert await batch.execute() == [True, [b"c", b"3"]]
        finally:
            await client.aclose()

    run(body())
