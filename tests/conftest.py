from __future__ import annotations

from collections.abc import Iterator

import pytest

from splitwise.testing.redis_cluster import RedisClusterServers
from splitwise.testing.redis_server import RedisServer


@pytest.fixture()
def redis_server() -> Iterator[RedisServer]:
    """A fresh real redis-server on a free loopback port. Missing redis-server fails the test."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServers]:
    """A real 3-master Redis Cluster, started once for the session (when first needed): tests share
    it under topics of their own."""
    servers = RedisClusterServers().start()
    try:
        yield servers
    finally:
        servers.stop()
