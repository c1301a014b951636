"""Redis connection handling: password, clear start-up errors, back-off (no hot spin) during an outage."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest
from scheduler_support import cluster, run

from scheduler.config import SchedulerConfig
from scheduler.connection import MIN_REDIS_VERSION, parse_version
from scheduler.errors import SchedulerConnectionError
from scheduler.frontend import FrontendScheduler
from scheduler.messages import Finished, SubmitRequest
from splitwise.testing.redis_server import RedisServer


@pytest.fixture()
def password_server() -> Iterator[RedisServer]:
    server = RedisServer(password="s3cret").start()
    try:
        yield server
    finally:
        server.stop()


def test_password_required_and_used(password_server: RedisServer) -> None:
    base = SchedulerConfig(scheduler_port=password_server.port, heartbeat_interval_s=0.1, block_ms=100)

    async def body() -> None:
        for password, message in [(None, "needs a password"), ("wrong", "rejected the password")]:
            fe = FrontendScheduler(
                dataclasses.replace(base, scheduler_password=password), model_id="sim-model"
            )
            with pytest.raises(SchedulerConnectionError, match=message):
                await fe.start()
        async with cluster(dataclasses.replace(base, scheduler_password="s3cret")) as c:
            await c.add_node("m0", "mixed")
            fe = await c.add_frontend()
            msgs = await (await fe.submit(SubmitRequest(req_id="r0", prompt_token_ids=[1]))).collect()
            assert isinstance(msgs[-1], Finished)

    run(body())


def test_unreachable_redis_is_a_clear_error(config: SchedulerConfig, redis_server: RedisServer) -> None:
    redis_server.stop()
    with pytest.raises(SchedulerConnectionError, match="cannot reach Redis at 127.0.0.1:"):
        run(FrontendScheduler(config, model_id="m").start())


def test_version_parsing() -> None:
    assert parse_version("6.2.0") >= MIN_REDIS_VERSION > parse_version("6.0.16")
    assert parse_version("7.0.15") > MIN_REDIS_VERSION


def test_outage_backs_off_then_recovers(config: SchedulerConfig, redis_server: RedisServer) -> None:
    """One second without Redis costs each loop a handful of attempts (back-off, not a hot spin);
    afterwards nodes re-register and requests flow again."""

    async def body() -> None:
        async with cluster(config) as c:
            node = await c.add_node("m0", "mixed")
            fe = await c.add_frontend()
            redis_server.stop()
            await asyncio.sleep(1.0)
            during = fe.stats.get("redis_errors") + node.agent.stats.get("redis_errors")
            redis_server.start()
            assert 0 < during < 60, during  # 4 loops; FastDeploy's loops spin thousands of times here
            for i in range(50):
                try:
                    stream = await fe.submit(SubmitRequest(req_id=f"r{i}", prompt_token_ids=[1]))
                except (SchedulerConnectionError, Exception):
                    await asyncio.sleep(0.1)  # until the node has re-registered
                    continue
                assert isinstance((await stream.collect())[-1], Finished)
                break
            else:
                raise AssertionError("no request succeeded after Redis came back")
            assert node.agent.stats.get("reregistered") >= 1

    run(body())


def test_redis_server_fixture_removes_its_working_directory() -> None:
    from splitwise.testing.redis_server import RedisServer

    server = RedisServer().start()
    workdir = server.workdir
    assert workdir.is_dir()
    server.restart()  # a restart starts empty, in a fresh directory
    assert workdir.is_dir()
    server.stop()
    assert not workdir.exists()
