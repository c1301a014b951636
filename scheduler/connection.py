"""Redis connections for the scheduler: one server, a Redis Cluster or Sentinel; credentials, TLS,
timeouts and the server checks at start.

Both client kinds (asyncio for the loops, blocking for the heartbeat thread) are built from the same
keyword arguments, so the two can never disagree about where Redis is or how to authenticate.
"""

from __future__ import annotations

from typing import Any, cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from scheduler.config import SchedulerConfig
from scheduler.errors import RedisVersionError, SchedulerConnectionError

MIN_REDIS_VERSION = (6, 2, 0)
# Errors that mean "Redis is (temporarily) not there": loops back off and retry on these.
# ReadOnlyError: a Sentinel failover demoted the server we were talking to (reconnect finds the new one).
REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    MasterNotFoundError,
)


def _connection_kwargs(config: SchedulerConfig, *, socket_timeout_s: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "password": config.scheduler_password,
        "socket_connect_timeout": 2.0,
        "socket_timeout": socket_timeout_s,
        "socket_keepalive": True,
        "decode_responses": False,
    }
    if not config.scheduler_cluster:
        kwargs["db"] = config.scheduler_db
        kwargs["health_check_interval"] = 30
    if config.scheduler_tls:
        kwargs["ssl"] = True
        if config.scheduler_tls_ca_certs:
            kwargs["ssl_ca_certs"] = config.scheduler_tls_ca_certs
    return kwargs


def make_client(config: SchedulerConfig, *, max_connections: int = 64) -> aioredis.Redis:
    """A pooled asyncio client. Blocking reads hold their own pooled connection while they wait.

    One immediate redis-py retry, on a connection error only: a pooled connection that died with a
    restarted server fails once and is replaced at once (without it, every stale connection of the
    pool failed one request in turn: 503s for tens of seconds after Redis was back). Anything longer
    is our loops' retry/back-off (``scheduler.retry``), so a down server costs a few attempts per
    second, and the caller decides what to do meanwhile. A Redis Cluster
    client is typed as ``Redis``: we only use commands both clients offer, on keys of one slot.
    """
    # Must exceed the longest BLOCK we issue (a node's idle read: 4 x block_ms).
    kwargs = _connection_kwargs(config, socket_timeout_s=4 * config.block_ms / 1000 + 5.0)
    if config.scheduler_cluster:
        return cast(
            aioredis.Redis,
            AsyncRedisCluster(
                host=config.scheduler_host,
                port=config.scheduler_port,
                max_connections=max_connections,
                **kwargs,
            ),
        )
    kwargs["retry"] = AsyncRetry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    if config.scheduler_sentinel:
        sentinel = AsyncSentinel(  # type: ignore[no-untyped-call]
            config.sentinel_addresses(),
            sentinel_kwargs={"socket_connect_timeout": 2.0, "socket_timeout": 2.0},
        )
        master: aioredis.Redis = sentinel.master_for(
            config.scheduler_sentinel_service, max_connections=max_connections, **kwargs
        )
        return master
    return aioredis.Redis(
        host=config.scheduler_host, port=config.scheduler_port, max_connections=max_connections, **kwargs
    )


def make_sync_client(config: SchedulerConfig) -> redis.Redis:
    """A blocking client with its own connection (the heartbeat thread's)."""
    kwargs = _connection_kwargs(config, socket_timeout_s=max(2.0, config.dead_after_ms / 1000))
    if config.scheduler_cluster:
        return cast(
            redis.Redis, RedisCluster(host=config.scheduler_host, port=config.scheduler_port, **kwargs)
        )
    kwargs["retry"] = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    if config.scheduler_sentinel:
        sync_sentinel = Sentinel(  # type: ignore[no-untyped-call]
            config.sentinel_addresses(),
            sentinel_kwargs={"socket_connect_timeout": 2.0, "socket_timeout": 2.0},
        )
        sync_master: redis.Redis = sync_sentinel.master_for(config.scheduler_sentinel_service, **kwargs)  # type: ignore[no-untyped-call]
        return sync_master
    return redis.Redis(host=config.scheduler_host, port=config.scheduler_port, **kwargs)


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


async def check_server(client: aioredis.Redis, config: SchedulerConfig) -> str:
    """Fail fast with a clear message: unreachable, bad password, or a Redis older than 6.2.

    Returns the server's version string.
    """
    where = config.where
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
    if config.scheduler_cluster and "redis_version" not in info:
        # A cluster client answers per node: {node: info}; any one tells the version.
        info = next(iter(info.values())) if info else {}
    version = str(info.get("redis_version", "0"))
    if parse_version(version) < MIN_REDIS_VERSION:
        raise RedisVersionError(
            f"Redis at {where} is {version}; splitwise needs >= 6.2 (ZMSCORE, XADD NOMKSTREAM)"
        )
    return version


StreamEntry = tuple[bytes, dict[bytes, bytes]]


def stream_entries(answer: Any) -> list[StreamEntry]:
    """Flatten an XREAD reply ([[stream, [(id, fields), ...]], ...]) into its entries."""
    return [(entry_id, fields) for _stream, batch in (answer or []) for entry_id, fields in batch]


def stream_id(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id as a comparable (ms, seq)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def after_id(entry_id: str) -> str:
    """The smallest stream id after ``entry_id`` ('' before anything was read): trimming with it as
    MINID removes exactly what was read."""
    if entry_id in ("", "0-0"):
        return ""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"
