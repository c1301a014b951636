"""The cluster token that authenticates P<->D control connections.

Precedence: ``--cluster-token``, then env ``SPLITWISE_CLUSTER_TOKEN``, then a random per-topic
token kept in Redis (created once with SET NX by whichever instance comes first), so that whoever
may use the Redis may join and nobody else. With the local scheduler there is no peer: a random
process-local token.
"""

from __future__ import annotations

import os
import secrets

import redis.asyncio as aioredis

from scheduler.keys import KeySchema

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
