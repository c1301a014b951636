"""Operator records: per-request lifecycle events and the dead-letter stream.

Both are plain stream fields (not msgpack) so ``redis-cli XRANGE`` shows them as they are. Writers
add them to a pipeline they are already sending, so recording costs no extra round trip.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio.client import Pipeline

from scheduler.keys import KeySchema

# The lifecycle, in order; `inspect --request` prints what was recorded with timestamps.
EVENTS = (
    "dispatched",
    "received",
    "prefilled",
    "transferred",
    "decoding",
    "redispatched",
    "finished",
    "error",
    "expired",
    "cancelled",
)
EVENTS_MAXLEN = 256
DEAD_LETTERS_MAXLEN = 10_000


def add_event(
    pipe: Pipeline,
    keys: KeySchema,
    req_id: str,
    event: str,
    *,
    node: str,
    now_ms: int,
    ttl_ms: int,
    detail: str = "",
) -> None:
    key = keys.request_events(req_id)
    pipe.xadd(
        key,
        {"event": event, "node": node, "detail": detail, "ts_ms": now_ms},
        maxlen=EVENTS_MAXLEN,
        approximate=True,
    )
    pipe.pexpire(key, ttl_ms)


def add_dead_letter(
    pipe: Pipeline, keys: KeySchema, *, source: str, reason: str, payload: bytes, now_ms: int, ttl_ms: int
) -> None:
    pipe.xadd(
        keys.dead_letters,
        {"source": source, "reason": reason, "payload": payload, "ts_ms": now_ms},
        maxlen=DEAD_LETTERS_MAXLEN,
        approximate=True,
    )
    pipe.pexpire(keys.dead_letters, ttl_ms)


def decode_fields(fields: dict[Any, Any]) -> dict[str, str]:
    """Stream fields as text (payload bytes shown with replacement characters)."""
    out = {}
    for k, v in fields.items():
        key = k.decode() if isinstance(k, bytes) else str(k)
        out[key] = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    return out
