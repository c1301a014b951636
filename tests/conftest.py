from __future__ import annotations

from collections.abc import Iterator

import pytest

from splitwise.testing.redis_server import RedisServer


@pytest.fixture()
def redis_server() -> Iterator[RedisServer]:
    """A fresh real redis-server on a free loopback port. Missing redis-server fails the test."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()
