"""Keys of the wrong type: found when Redis answers WRONGTYPE, dead-lettered, deleted, re-created.

Any client of the Redis server can write any key, so a key of ours may hold the wrong type (a
string where a stream belongs, a hash where the lease ZSET belongs). Every command on it then fails
with ``WRONGTYPE`` and, left alone, the loop that issues it fails forever: a node whose heartbeat
hash is a string can no longer beat, a frontend whose bookings ZSET is a string can dispatch
nothing. The mechanism, in one place:

1. ``is_wrong_type(exc)`` recognises the answer (the Retrier asks it for every failed step);
2. the side whose step failed calls ``REPAIR`` over the keys it uses, with the type each must have;
3. the script dead-letters every key whose type differs (source ``key:<kind>``, the reason names
   both types, the payload is the value when it was a string), deletes it, and re-creates the
   streams empty (writers use ``XADD NOMKSTREAM``); hashes and sorted sets come back with their
   next write;
4. the caller re-registers what lived in the deleted keys (a node drops its lease member, so its
   next heartbeat runs the full registration).

Values that parse wrong inside keys of the right type (a heartbeat ``ts_ms`` of ``"abc"``) are
not repaired here: their readers treat them as missing (``parse_int``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from scheduler.config import SchedulerConfig
from scheduler.keys import ROLE_LETTERS, KeySchema
from scheduler.messages import encode
from scheduler.metrics import Counters
from scheduler.records import DEAD_LETTERS_MAXLEN
from scheduler.registry import ClusterView, node_group
from scheduler.scripting import LuaScript
from splitwise.logging import get_logger

log = get_logger("scheduler.poison")

REPAIR = LuaScript(
    "repair",
    """
-- Dead-letter, delete and (streams) re-create every key whose type is not the expected one.
-- KEYS[1] dead letters STREAM  KEYS[1+i] key i
-- ARGV[1] TTL ms of the re-created streams and the dead letters  ARGV[2] dead letters MAXLEN
-- ARGV[2+i] expected type of key i ('hash', 'zset', 'stream', 'string')
-- ARGV[2+n+i] kind of key i (dead-letter source 'key:<kind>')
-- Returns {key i, type found, ...} for the keys it repaired.
local n = #KEYS - 1
local dead, ttl, maxlen = KEYS[1], ARGV[1], ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local repaired = {}
local function wrong(key, expected)
  local found = redis.call('TYPE', key)['ok']
  if found == 'none' or found == expected then return nil end
  return found
end
local dead_type = wrong(dead, 'stream')
if dead_type then
  redis.call('DEL', dead)
  repaired[#repaired + 1] = dead
  repaired[#repaired + 1] = dead_type
end
for i = 1, n do
  local key, expected, kind = KEYS[1 + i], ARGV[2 + i], ARGV[2 + n + i]
  local found = wrong(key, expected)
  if found then
    local payload = ''
    if found == 'string' then payload = redis.call('GET', key) end
    redis.call('XADD', dead, 'MAXLEN', '~', maxlen, '*', 'source', 'key:' .. kind,
      'reason', 'wrong type ' .. found .. ' (expected ' .. expected .. '): ' .. key,
      'payload', payload, 'ts_ms', now)
    redis.call('PEXPIRE', dead, ttl)
    redis.call('DEL', key)
    if expected == 'stream' then
      redis.call('XADD', key, 'MAXLEN', '0', '*', 'created', now)
      redis.call('PEXPIRE', key, ttl)
    end
    repaired[#repaired + 1] = key
    repaired[#repaired + 1] = found
  end
end
return repaired
""",
)

# (key, expected type, kind) for one REPAIR call.
KeyTypes = Sequence[tuple[str, str, str]]


def is_wrong_type(exc: BaseException) -> bool:
    """Redis refused a command because a key holds another type than the command needs."""
    return isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE")


def parse_int(value: object, default: int = 0) -> int:
    """An integer field written by us, or ``default`` when something else wrote garbage there."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    try:
        return int(float(text)) if "." in text or "e" in text.lower() else int(text)
    except (ValueError, OverflowError):
        return default


def node_key_types(keys: KeySchema, node_id: str, candidates_key: str) -> list[tuple[str, str, str]]:
    """Every key a node's heartbeat and reader touch."""
    return [
        (keys.nodes, "hash", "nodes"),
        (keys.alive, "zset", "alive"),
        (candidates_key, "zset", "cand"),
        (keys.heartbeat(node_id), "hash", "hb"),
        (keys.work(node_id), "stream", "work"),
        (keys.control(node_id), "stream", "ctl"),
    ]


def frontend_key_types(
    keys: KeySchema, frontend_id: str, candidate_keys: Sequence[str]
) -> list[tuple[str, str, str]]:
    """Every key a frontend's heartbeat, dispatch and loops touch (candidate sets of its view)."""
    return [
        (keys.frontends, "zset", "frontends"),
        (keys.results(frontend_id), "stream", "results"),
        (keys.bookings, "zset", "bookings"),
        (keys.epoch, "string", "epoch"),
        (keys.log, "stream", "log"),
        (keys.nodes, "hash", "nodes"),
        (keys.alive, "zset", "alive"),
        *((key, "zset", "cand") for key in candidate_keys),
    ]


def _args(keys: KeySchema, config: SchedulerConfig, key_types: KeyTypes) -> tuple[list[str], list[Any]]:
    return (
        [keys.dead_letters, *(k for k, _t, _kind in key_types)],
        [
            config.dead_letter_ttl_ms,
            DEAD_LETTERS_MAXLEN,
            *(t for _k, t, _kind in key_types),
            *(kind for _k, _t, kind in key_types),
        ],
    )


def _report(answer: Any, stats: Counters, who: str) -> dict[str, str]:
    flat = [v.decode() if isinstance(v, bytes) else str(v) for v in answer or []]
    repaired = dict(zip(flat[::2], flat[1::2], strict=True))
    for key, found in repaired.items():
        stats.inc("wrong_type_keys")
        stats.inc("dead_letters")
        log.error("wrong_type_key_repaired", key=key, found=found, by=who)
    return repaired


Beat = Callable[[redis.Redis], None]


@dataclass
class Repairer:
    """REPAIR over the keys one side uses (``key_types`` is re-read per call: a frontend's candidate
    sets follow its view). ``rejoin``: a node's lease member, dropped after any repair so that its
    next heartbeat re-registers in full; ``after``: told what was repaired (any thread)."""

    keys: KeySchema
    config: SchedulerConfig
    stats: Counters
    key_types: Callable[[], KeyTypes]
    who: str
    rejoin: str = ""
    after: Callable[[dict[str, str]], object] | None = None
    # Set by ``run`` (the loop), consumed by the guarded heartbeat (its thread): re-register there,
    # where the member is dropped and re-added in one beat, so dispatch never sees the node missing.
    rejoin_pending: bool = False

    async def run(self, client: aioredis.Redis) -> dict[str, str]:
        """Returns {key: type found} of what it repaired."""
        names, args = _args(self.keys, self.config, self.key_types())
        return self._done(_report(await REPAIR.call(client, names, args), self.stats, self.who))

    def run_sync(self, client: redis.Redis) -> dict[str, str]:
        names, args = _args(self.keys, self.config, self.key_types())
        return self._done(_report(REPAIR.call_sync(client, names, args), self.stats, self.who))

    def _done(self, fixed: dict[str, str]) -> dict[str, str]:
        # A re-created stream needs nothing more; any other key held part of the registration.
        if self.rejoin and any(key.split(":", 2)[1] not in ("work", "ctl") for key in fixed):
            self.rejoin_pending = True
        if self.after is not None:
            self.after(fixed)
        return fixed

    def guard(self, beat: Beat) -> Beat:
        """A heartbeat that, when a key of the wrong type fails it, repairs and beats again at once, so
        a poisoned key never costs a lease; it re-registers in full after a repair (``rejoin``)."""

        def once(client: redis.Redis) -> None:
            if self.rejoin_pending:
                self.rejoin_pending = False
                client.zrem(self.keys.alive, self.rejoin)  # so the beat right after re-registers
            beat(client)

        def guarded(client: redis.Redis) -> None:
            try:
                once(client)
            except ResponseError as exc:
                if not is_wrong_type(exc):
                    raise
                self.run_sync(client)
                once(client)

        return guarded


def republish_view(pipe: Any, keys: KeySchema, view: ClusterView, repaired: dict[str, str]) -> None:
    """Queue what a frontend knows of the registry back into repaired registry keys (node
    descriptions, leases, candidate members at load 0), so live nodes stay dispatchable without
    waiting for their next registration."""
    for node_id, state in view.nodes.items():
        member = f"{node_id}|{state.incarnation}"
        if keys.nodes in repaired:
            pipe.hset(keys.nodes, node_id, encode(state.info))
        if keys.alive in repaired:
            pipe.zadd(keys.alive, {member: state.lease_expiry_ms}, nx=True)
        cand = keys.candidates(node_group(state.info), ROLE_LETTERS[state.info.role])
        if cand in repaired:
            pipe.zadd(cand, {member: 0}, nx=True)
