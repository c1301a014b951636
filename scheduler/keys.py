"""The one place Redis key names are made. See docs/redis-keys.md for types, writers, readers, TTLs.

Every key is ``{<topic>}:<kind>[:<id>]``: the braces are a Redis Cluster hash tag, so one topic
lives in one slot and our multi-key Lua scripts stay legal there. Ids are node ids, frontend ids
and request ids; they must not contain ``{``, ``}``, ``|`` or whitespace (checked by ``check_id``).
"""

from __future__ import annotations

import hashlib
import re
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


@dataclass(frozen=True)
class KeySchema:
    topic: str

    @property
    def prefix(self) -> str:
        return "{" + self.topic + "}:"

    # --- membership and leases ----------------------------------------------------------------
    @property
    def nodes(self) -> str:
        """HASH node_id -> msgpack NodeInfo."""
        return self.prefix + "nodes"

    @property
    def alive(self) -> str:
        """ZSET ``node_id|incarnation`` -> lease expiry (Redis server ms). Liveness of nodes."""
        return self.prefix + "alive"

    @property
    def frontends(self) -> str:
        """ZSET frontend_id -> lease expiry (Redis server ms). Liveness of frontends."""
        return self.prefix + "frontends"

    def heartbeat(self, node_id: str) -> str:
        """HASH of the node's incarnation, last beat time and load report (operators, inspect)."""
        return self.prefix + "hb:" + node_id

    @property
    def epoch(self) -> str:
        """STRING: random value set once per data set; when it changes, Redis lost its data."""
        return self.prefix + "epoch"

    # --- dispatch --------------------------------------------------------------------------------
    def candidates(self, group: str, role_letter: str) -> str:
        """ZSET ``node_id|incarnation`` -> load score, one per compatibility group and role."""
        return self.prefix + "cand:" + group + ":" + role_letter

    @property
    def bookings(self) -> str:
        """ZSET of individual bookings ``kind|group|node|inc|req_id|attempt|amount`` -> expiry ms."""
        return self.prefix + "bookings"

    # --- work, control and results ---------------------------------------------------------------
    def work(self, node_id: str) -> str:
        """STREAM of msgpack WorkItems for one node."""
        return self.prefix + "work:" + node_id

    def control(self, node_id: str) -> str:
        """STREAM of msgpack CancelMessages for one node."""
        return self.prefix + "ctl:" + node_id

    def results(self, frontend_id: str) -> str:
        """STREAM of msgpack result messages for one frontend."""
        return self.prefix + "results:" + frontend_id

    # --- records ------------------------------------------------------------------------------------
    @property
    def log(self) -> str:
        """STREAM of request lifecycle records (one entry carries the records of many requests)."""
        return self.prefix + "log"

    @property
    def dead_letters(self) -> str:
        """STREAM of undecodable payloads with source and reason."""
        return self.prefix + "dead"

    # --- security ------------------------------------------------------------------------------------
    @property
    def cluster_token(self) -> str:
        """STRING: random per-topic token authenticating P<->D control connections. No TTL; owner:
        the cluster (the first instance creates it with SET NX; an operator DELs it to rotate)."""
        return self.prefix + "cluster_token"

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
        if kind in {"hb", "work", "ctl", "results"}:
            return kind
        return None
