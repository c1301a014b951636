"""PrefixIndexLoop against a real redis-server, with a fake engine worker: the first publish is a
snapshot replacing a stale set, then deltas, with a TTL, and the clean-up on close."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from scheduler.keys import KeySchema
from scheduler.prefix_index import PrefixIndexPublisher, short_hash
from splitwise.counters import Counters
from splitwise.instance.prefix_publisher import PrefixIndexLoop
from splitwise.testing.redis_server import RedisServer


class FakeManager:
    def __init__(self) -> None:
        self.cached: set[int] = set()
        self.changes: list[tuple[int, bool]] = []

    def take_cache_changes(self, *, full: bool = False) -> tuple[list[tuple[int, bool]], list[int] | None]:
        changes, self.changes = self.changes, []
        return ([], sorted(self.cached)) if full else (changes, None)


class FakeWorker:
    def __init__(self) -> None:
        self.block_manager = FakeManager()

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        return fn(self)


def test_deltas_snapshots_and_close(redis_server: RedisServer) -> None:
    async def body() -> None:
        client = aioredis.Redis(host=redis_server.host, port=redis_server.port)
        keys = KeySchema("pfxtest")
        worker = FakeWorker()
        counters = Counters()
        publisher = PrefixIndexPublisher(client, keys, "p0", ttl_ms=5000)
        loop = PrefixIndexLoop(worker, publisher, counters, interval_s=0.1)  # type: ignore[arg-type]
        key = keys.prefix_index("p0")
        await client.sadd(key, "stale")  # a previous incarnation's set
        manager = worker.block_manager
        manager.cached = {1, 2}
        await loop.once()  # the first publish is a snapshot: the stale member goes
        assert await client.smembers(key) == {short_hash(1).encode(), short_hash(2).encode()}
        manager.cached = {2, 3}
        manager.changes = [(3, True), (1, False)]
        await loop.once()
        assert await client.smembers(key) == {short_hash(2).encode(), short_hash(3).encode()}
        assert 0 < await client.pttl(key) <= 5000
        assert counters.get("prefix_index_hashes_published") == 4
        await loop.close()
        assert await client.exists(key) == 0
        await client.aclose()

    asyncio.run(body())
