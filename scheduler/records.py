"""Operator records: the request log and the dead-letter stream.

Request log ``{t}:log``: one stream entry carries the records of one or more requests (field =
req_id, value = lines ``<ts_ms> <event> <node> <detail>``), so recording rides on writes that are
sent anyway and costs one command per flush however many requests it covers. The frontend writes
a request's whole history (its own events plus the ``NodeEvent``s its nodes sent along with the
results) when the request ends or is re-dispatched. Plain text, readable with ``redis-cli XRANGE``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis

from scheduler.clock import Clock
from scheduler.config import SchedulerConfig
from scheduler.connection import REDIS_DOWN_ERRORS
from scheduler.keys import KeySchema
from scheduler.metrics import Counters
from splitwise.logging import get_logger

log = get_logger("scheduler.records")

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
    "orphaned",
)
DEAD_LETTERS_MAXLEN = 10_000


def record_line(ts_ms: int, event: str, node: str, detail: str) -> str:
    return f"{ts_ms} {event} {node} {detail}".rstrip()


def parse_record(text: str) -> list[dict[str, str]]:
    """Record lines back into {ts_ms, event, node, detail} dicts (inspect)."""
    out = []
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if len(parts) >= 3:
            out.append(
                {
                    "ts_ms": parts[0],
                    "event": parts[1],
                    "node": parts[2],
                    "detail": parts[3] if len(parts) > 3 else "",
                }
            )
    return out


async def find_request(
    client: aioredis.Redis, keys: KeySchema, req_id: str, *, scan: int = 100_000
) -> list[dict[str, str]]:
    """Every recorded event of ``req_id``, oldest first (scans the newest ``scan`` log entries)."""
    field = req_id.encode()
    events: list[dict[str, str]] = []
    last = "+"
    seen = 0
    while seen < scan:
        batch: Any = await client.xrevrange(keys.log, max=last, count=1000)
        if not batch:
            break
        for _entry_id, fields in batch:
            if field in fields:
                events[:0] = parse_record(fields[field].decode("utf-8", "replace"))
        seen += len(batch)
        last = "(" + batch[-1][0].decode()
    return events


async def write_dead_letter(
    client: aioredis.Redis,
    keys: KeySchema,
    config: SchedulerConfig,
    stats: Counters,
    clock: Clock,
    source: str,
    reason: str,
    payload: bytes,
) -> None:
    """Record an undecodable payload (the caller then drops it and goes on). Never raises for Redis."""
    stats.inc("dead_letters")
    log.error("dead_letter", source=source, reason=reason, size_bytes=len(payload))
    pipe = client.pipeline(transaction=False)
    pipe.xadd(
        keys.dead_letters,
        {"source": source, "reason": reason, "payload": payload, "ts_ms": clock.time_ms()},
        maxlen=DEAD_LETTERS_MAXLEN,
        approximate=True,
    )
    pipe.pexpire(keys.dead_letters, config.dead_letter_ttl_ms)
    try:
        await pipe.execute()
    except REDIS_DOWN_ERRORS as exc:
        log.warning("dead_letter_write_failed", error=str(exc))


def decode_fields(fields: dict[Any, Any]) -> dict[str, str]:
    """Stream fields as text (payload bytes shown with replacement characters)."""
    out = {}
    for k, v in fields.items():
        key = k.decode() if isinstance(k, bytes) else str(k)
        out[key] = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    return out


def lines(events: Iterable[tuple[int, str, str, str]]) -> str:
    return "\n".join(record_line(*e) for e in events)
