"""The one place Redis key names are made. See docs/redis-keys.md for types, writers, readers, TTLs.

Every key is ``{<topic>}:<kind>[:<id>]``: the braces are a Redis Cluster hash tag, so one topic
lives in one slot and our multi-key Lua scripts stay legal there. Ids are node ids, frontend ids
and request ids; they must not contain ``{``, ``}``, ``|`` or whitespace (checked by ``check_id``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

# Keys (by ``KeySchema.classify`` kind) that deliberately have no TTL; each has a documented owner
# (docs/redis-keys.md). Every other key under a topic must carry a TTL.
OWNED_WITHOUT_TTL = frozenset({"cluster_token"})

# Candidate-set roles: one sorted set per compatibility group and role letter.
ROLE_LETTERS = {"prefill": "p", "decode": "d", "mixed": "m"}

_BAD_ID = re.compile(r"[{}\s|]")


def check_id(kind: str, value: str) -> str:
    """Ids are embedded in key names and booking members; reject the characters that would break them."""
    if not value or _BAD_ID.search(value) or len(value) > 200:
        raise ValueError(f"{kind} {value!r}: must be 1-200 chars without braces, '|' or whitespace")
    return value


def group_id(model_id: str, kv_fields: tuple[object, ...]) -> str:
    """A short stable name for one compatibility group (model id + KV geometry): nodes pair only
    inside a group, and each group has its own candidate sets."""
    text = "|".join([model_id, *(str(f) for f in kv_fields)])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


class _Fixed:
    """A key with a fixed name under the topic: ``schema.<attr>`` is ``{topic}:<name>``."""

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.__doc__ = doc

    def __get__(self, schema: KeySchema, owner: type | None = None) -> str:
        return schema.prefix + self.name


class _PerId:
    """A family of keys, one per id: ``schema.<attr>(id)`` is ``{topic}:<kind>:<id>``."""

    def __init__(self, kind: str, doc: str) -> None:
        self.kind = kind
        self.__doc__ = doc

    def __get__(self, schema: KeySchema, owner: type | None = None) -> Callable[[str], str]:
        head = schema.prefix + self.kind + ":"
        return lambda ident: head + ident


@dataclass(frozen=True)
class KeySchema:
    topic: str

    @property
    def prefix(self) -> str:
        return "{" + self.topic + "}:"

    # membership and leases
    nodes = _Fixed("nodes", "HASH node_id -> msgpack NodeInfo.")
    alive = _Fixed("alive", "ZSET node_id|incarnation -> lease expiry (Redis server ms): node liveness.")
    frontends = _Fixed("frontends", "ZSET frontend_id -> lease expiry (Redis server ms): frontend liveness.")
    heartbeat = _PerId("hb", "HASH of a node's incarnation, last load change and load report (operators).")
    epoch = _Fixed("epoch", "STRING: random, set once per data set; a new value means Redis lost its data.")
    # dispatch
    bookings = _Fixed("bookings", "ZSET of bookings kind|group|node|inc|req_id|attempt|amount -> expiry ms.")
    # work, control and results
    work = _PerId("work", "STREAM of msgpack WorkItems for one node.")
    control = _PerId("ctl", "STREAM of msgpack CancelMessages (and MigrateCommands) for one node.")
    results = _PerId("results", "STREAM of msgpack results (and node events) for one frontend.")
    # KV-aware routing (#15): which prefix blocks a node's cache holds
    prefix_index = _PerId("pfx", "SET of a node's cached block hashes (16 hex digits each).")
    # records
    log = _Fixed("log", "STREAM of request records (one entry carries the records of many requests).")
    dead_letters = _Fixed("dead", "STREAM of undecodable payloads with source and reason.")
    # security: no TTL; owner: the cluster (the first instance creates it with SET NX; an operator
    # DELs it to rotate)
    cluster_token = _Fixed(
        "cluster_token", "STRING: random per-topic token authenticating P<->D connections."
    )

    def candidates(self, group: str, role_letter: str) -> str:
        """ZSET ``node_id|incarnation`` -> load score, one per compatibility group and role."""
        return self.prefix + "cand:" + group + ":" + role_letter

    # --- operators -------------------------------------------------------------------------------------
    def all_pattern(self) -> str:
        """SCAN MATCH pattern for every key of this topic (braces escaped for glob)."""
        return "\\{" + self.topic + "\\}:*"

    def classify(self, key: str) -> str | None:
        """Which schema entry a key belongs to, or None when it is not ours (used by the TTL audit)."""
        if not key.startswith(self.prefix):
            return None
        rest = key[len(self.prefix) :]
        fixed = {"nodes", "alive", "frontends", "epoch", "bookings", "log", "dead", "cluster_token"}
        if rest in fixed:
            return rest
        kind, _, ident = rest.partition(":")
        if not ident:
            return None
        if kind == "cand":
            group, _, letter = ident.partition(":")
            return "cand" if group and letter in ROLE_LETTERS.values() else None
        if kind in {"hb", "work", "ctl", "results", "pfx"}:
            return kind
        return None
