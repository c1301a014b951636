"""The cluster token that authenticates P<->D control connections.

Precedence: ``--cluster-token``, then env ``SPLITWISE_CLUSTER_TOKEN``, then a random per-topic
token kept in Redis (created once with SET NX by whichever instance comes first), so that whoever
may use the Redis may join and nobody else. With the local scheduler there is no peer: a random
process-local token.

A Redis restarted empty (or a flushed topic) loses the key, but every live instance still holds the
token: each re-publishes it with SET NX once per heartbeat interval (``keep_published``), so a node
that joins after the restart reads the same token and pairs with the old ones. (A node that starts
within that first interval after the restart, before any old node re-published, would create a new
token; configure ``--cluster-token`` where that window matters.)
"""

from __future__ import annotations

import asyncio
import os
import secrets

import redis.asyncio as aioredis

from scheduler.connection import REDIS_DOWN_ERRORS
from scheduler.keys import KeySchema
from splitwise.counters import Counters
from splitwise.logging import get_logger

log = get_logger(__name__)

ENV_VAR = "SPLITWISE_CLUSTER_TOKEN"


def explicit_token(flag_value: str | None) -> str | None:
    return flag_value or os.environ.get(ENV_VAR) or None


async def token_from_redis(client: aioredis.Redis, keys: KeySchema) -> str:
    """The topic's shared token, creating it if absent (race-free: SET NX, then read back)."""
    key = keys.cluster_token
    await client.set(key, secrets.token_hex(32), nx=True)
    value = await client.get(key)
    if value is None:  # deleted between SET and GET (an operator rotating it): try once more
        await client.set(key, secrets.token_hex(32), nx=True)
        value = await client.get(key)
    return value.decode() if isinstance(value, bytes) else str(value)


async def keep_published(
    client: aioredis.Redis, keys: KeySchema, token: str, *, interval_s: float, counters: Counters
) -> None:
    """Re-publish ``token`` whenever the key is missing (Redis lost its data), until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            if await client.set(keys.cluster_token, token, nx=True):
                counters.inc("cluster_token_republished")
                log.warning("cluster token re-published (the key was missing: Redis lost its data?)")
        except REDIS_DOWN_ERRORS as exc:
            log.debug("cluster token re-publish failed; retrying", error=str(exc))
