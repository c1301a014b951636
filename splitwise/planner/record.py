"""The planner's trail in Redis (docs/redis-keys.md), written by the planner, read by `inspect`.

- ``{t}:planner``: STREAM, one entry per action decided (never for a hold): ``ts_ms``, ``kind``,
  ``node``, ``target``, ``reason``, ``outcome`` (``sent`` or ``failed: <error>``), ``signals``
  (JSON). Capped (``MAXLEN ~ 1000``), 24 h TTL refreshed per write.
- ``{t}:planner_state``: HASH, the running planner's latest look: ``ts_ms``, ``planner_id``,
  ``decision`` (``hold`` or the action), ``reason``, ``signals`` and ``config`` (JSON). Its TTL is
  a few of the planner's intervals, so it vanishes when no planner runs.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import redis

from scheduler.keys import KeySchema
from splitwise.planner.policy import Decision, PolicyConfig

DECISIONS_MAXLEN = 1000
DECISIONS_TTL_MS = 24 * 3600 * 1000


def record_decision(
    client: redis.Redis, keys: KeySchema, decision: Decision, *, ts_ms: int, outcome: str
) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.xadd(
        keys.planner,
        {
            "ts_ms": ts_ms,
            "kind": decision.kind.value,
            "node": decision.node_id,
            "target": decision.target.value if decision.target else "",
            "reason": decision.reason,
            "outcome": outcome,
            "signals": json.dumps(decision.signals, sort_keys=True),
        },
        maxlen=DECISIONS_MAXLEN,
        approximate=True,
    )
    pipe.pexpire(keys.planner, DECISIONS_TTL_MS)
    pipe.execute()


def record_state(
    client: redis.Redis,
    keys: KeySchema,
    decision: Decision,
    *,
    planner_id: str,
    config: PolicyConfig,
    ts_ms: int,
    ttl_ms: int,
) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.hset(
        keys.planner_state,
        mapping={
            "ts_ms": ts_ms,
            "planner_id": planner_id,
            "decision": decision.kind.value,
            "reason": decision.reason,
            "signals": json.dumps(decision.signals, sort_keys=True),
            "config": json.dumps(dataclasses.asdict(config), sort_keys=True),
        },
    )
    pipe.pexpire(keys.planner_state, ttl_ms)
    pipe.execute()


def _text(fields: dict[Any, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
        )
        for k, v in fields.items()
    }


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return {"unparsed": text}


def parse_decisions(entries: list[Any]) -> list[dict[str, Any]]:
    """XREVRANGE entries of ``{t}:planner`` as dicts (newest first, as read)."""
    out = []
    for entry_id, fields in entries:
        row: dict[str, Any] = _text(fields)
        row["id"] = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        row["signals"] = _json(row.get("signals", "{}"))
        out.append(row)
    return out


def parse_state(fields: dict[Any, Any]) -> dict[str, Any] | None:
    if not fields:
        return None
    row: dict[str, Any] = _text(fields)
    row["signals"] = _json(row.get("signals", "{}"))
    row["config"] = _json(row.get("config", "{}"))
    return row
