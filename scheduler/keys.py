"""The one place Redis key names are made. See docs/redis-keys.md for types, writers, readers, TTLs.

Every key is ``{<topic>}:<kind>[:<id>]``: the braces are a Redis Cluster hash tag, so one topic
lives in one slot and our multi-key Lua scripts stay legal there. Ids are node ids, frontend ids
and request ids; they must not contain ``{``, ``}`` or whitespace (checked by ``check_id``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Consumer group on every node work stream; the node is its only consumer.
WORK_GROUP = "node"

# Keys (by ``KeySchema.classify`` kind) that deliberately have no TTL; each has a documented owner
# (docs/redis-keys.md). Every other key under a topic must carry a TTL.
OWNED_WITHOUT_TTL = frozenset({"cluster_token"})

_BAD_ID = re.compile(r"[{}\s|]")


def check_id(kind: str, value: str) -> str:
    """Ids are embedded in key names and booking members; reject the characters that would break them."""
    if not value or _BAD_ID.search(value) or len(value) > 200:
        raise ValueError(f"{kind} {value!r}: must be 1-200 chars without braces, '|' or whitespace")
    return value


@dataclass(frozen=True)
class KeySchema:
    topic: str

    @property
    def prefix(self) -> str:
        return "{" + self.topic + "}:"

    # --- cluster membership -------------------------------------------------------------------
    @property
    def nodes(self) -> str:
        """HASH node_id -> msgpack NodeInfo."""
        return self.prefix + "nodes"

    def heartbeat(self, node_id: str) -> str:
        """HASH of the node's incarnation, heartbeat time and load; PX = dead-after."""
        return self.prefix + "hb:" + node_id

    def frontend_heartbeat(self, frontend_id: str) -> str:
        """STRING (the frontend's start ms); PX = dead-after."""
        return self.prefix + "fe:" + frontend_id

    # --- work, control and results ------------------------------------------------------------
    def work(self, node_id: str) -> str:
        """STREAM of msgpack WorkItems for one node, consumer group ``node``."""
        return self.prefix + "work:" + node_id

    def control(self, node_id: str) -> str:
        """STREAM of msgpack CancelMessages for one node."""
        return self.prefix + "ctl:" + node_id

    def results(self, frontend_id: str) -> str:
        """STREAM of msgpack result messages for one frontend."""
        return self.prefix + "results:" + frontend_id

    # --- load accounting (see scripts.DISPATCH) -----------------------------------------------
    @property
    def bookings(self) -> str:
        """ZSET member ``kind|node|req_id|amount`` score = expiry ms (bounds leaks)."""
        return self.prefix + "bookings"

    @property
    def booked_prefill_tokens(self) -> str:
        """HASH node_id -> prompt tokens dispatched to it and not yet prefilled."""
        return self.prefix + "booked:prefill_tokens"

    @property
    def booked_decode_requests(self) -> str:
        """HASH node_id -> requests dispatched to it and not yet acked."""
        return self.prefix + "booked:decode_requests"

    # --- per request ----------------------------------------------------------------------------
    def request(self, req_id: str) -> str:
        """HASH: state, frontend, attempt, nodes, bookings of one request; TTL = request TTL."""
        return self.prefix + "req:" + req_id

    def request_events(self, req_id: str) -> str:
        """STREAM of lifecycle events (event, node, detail); TTL = request TTL."""
        return self.prefix + "req:" + req_id + ":events"

    # --- security -------------------------------------------------------------------------------
    @property
    def cluster_token(self) -> str:
        """STRING: random per-topic token authenticating P<->D control connections. No TTL; owner:
        the cluster (the first instance creates it with SET NX; an operator DELs it to rotate)."""
        return self.prefix + "cluster_token"

    # --- operators --------------------------------------------------------------------------------
    @property
    def dead_letters(self) -> str:
        """STREAM of undecodable payloads with source and reason."""
        return self.prefix + "dead"

    def all_pattern(self) -> str:
        """SCAN MATCH pattern for every key of this topic (braces escaped for glob)."""
        return "\\{" + self.topic + "\\}:*"

    def classify(self, key: str) -> str | None:
        """Which schema entry a key belongs to, or None when it is not ours (used by the TTL audit)."""
        if not key.startswith(self.prefix):
            return None
        rest = key[len(self.prefix) :]
        fixed = {
            "nodes",
            "cluster_token",
            "bookings",
            "booked:prefill_tokens",
            "booked:decode_requests",
            "dead",
        }
        if rest in fixed:
            return rest
        kind, _, ident = rest.partition(":")
        if not ident:
            return None
        if kind == "req":
            return "req:events" if ident.endswith(":events") else "req"
        if kind in {"hb", "fe", "work", "ctl", "results"}:
            return kind
        return None
