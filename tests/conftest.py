from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from splitwise.testing.redis_cluster import RedisClusterServers
from splitwise.testing.redis_server import RedisServer


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, object, None]:
    """Record each phase's report on the item (``item.rep_call``...): fixtures that tear down a
    cluster keep its logs when the test failed (``tests.instance.helpers.has_failed``)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


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
