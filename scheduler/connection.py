"""Redis connections for the scheduler: credentials, TLS, timeouts and the server checks at start."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from scheduler.config import SchedulerConfig
from scheduler.errors import RedisVersionError, SchedulerConnectionError

MIN_REDIS_VERSION = (6, 2, 0)
# Errors that mean "Redis is (temporarily) not there": loops back off and retry on these.
REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)


def make_client(config: SchedulerConfig, *, max_connections: int = 64) -> aioredis.Redis:
    """A pooled asyncio client. Blocking reads hold their own pooled connection while they wait.

    No redis-py internal retry: our loops own retry/back-off (``clock.ExponentialBackoff``) so a
    down server costs a few attempts per second, and the caller decides what to do meanwhile.
    """
    kwargs: dict[str, Any] = {
        "host": config.scheduler_host,
        "port": config.scheduler_port,
        "db": config.scheduler_db,
        "password": config.scheduler_password,
        "socket_connect_timeout": 2.0,
        # Must exceed the longest BLOCK we issue.
        "socket_timeout": config.block_ms / 1000 + 5.0,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "max_connections": max_connections,
        "decode_responses": False,
        # redis-py's own retries would hide an outage (and loop on auth errors); ours back off.
        "retry": Retry(NoBackoff(), 0),
    }
    if config.scheduler_tls:
        kwargs["ssl"] = True
        if config.scheduler_tls_ca_certs:
            kwargs["ssl_ca_certs"] = config.scheduler_tls_ca_certs
    return aioredis.Redis(**kwargs)


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


async def check_server(client: aioredis.Redis, config: SchedulerConfig) -> str:
    """Fail fast with a clear message: unreachable, bad password, or a Redis older than 6.2.

    Returns the server's run_id (it changes when Redis restarts, which is how frontends notice
    that queued state may be gone).
    """
    where = f"{config.scheduler_host}:{config.scheduler_port}"
    try:
        info = await client.info("server")
    except AuthenticationError as exc:
        if config.scheduler_password is None:
            raise SchedulerConnectionError(
                f"Redis at {where} needs a password (--scheduler-password)"
            ) from None
        raise SchedulerConnectionError(
            f"Redis at {where} rejected the password (--scheduler-password): {exc}"
        ) from None
    except ResponseError as exc:
        if "NOAUTH" in str(exc):
            raise SchedulerConnectionError(
                f"Redis at {where} needs a password (--scheduler-password)"
            ) from None
        raise
    except REDIS_DOWN_ERRORS as exc:
        raise SchedulerConnectionError(
            f"cannot reach Redis at {where} (--scheduler-host/--scheduler-port): {exc}"
        ) from None
    version = str(info.get("redis_version", "0"))
    if parse_version(version) < MIN_REDIS_VERSION:
        raise RedisVersionError(
            f"Redis at {where} is {version}; splitwise needs >= 6.2 (streams XAUTOCLAIM, GETDEL)"
        )
    return str(info.get("run_id", ""))


async def server_run_id(client: aioredis.Redis) -> str:
    info = await client.info("server")
    return str(info.get("run_id", ""))


StreamEntry = tuple[bytes, dict[bytes, bytes]]


def stream_entries(answer: Any) -> list[StreamEntry]:
    """Flatten an XREAD/XREADGROUP reply ([[stream, [(id, fields), ...]], ...]) into its entries."""
    return [(entry_id, fields) for _stream, batch in (answer or []) for entry_id, fields in batch]
