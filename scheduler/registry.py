"""The cluster as a frontend sees it: registered nodes, their incarnation and lease.

Refreshed once per heartbeat interval with one ZRANGE of the lease set; node descriptions
(``{t}:nodes``) are read only for members the view has not seen yet, so a steady cluster costs
one command per interval however many nodes it has. Dispatch never reads this view for liveness:
the dispatch script checks the leases of the candidates it samples itself.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from scheduler.errors import MessageDecodeError
from scheduler.keys import ROLE_LETTERS, KeySchema, group_id
from scheduler.messages import KVGeometry, NodeInfo, decode
from splitwise.logging import get_logger

log = get_logger("scheduler.registry")


@dataclass(frozen=True)
class NodeState:
    info: NodeInfo
    incarnation: str
    lease_expiry_ms: int

    def is_alive(self, now_ms: int) -> bool:
        return self.lease_expiry_ms > now_ms


@dataclass(frozen=True)
class CandidateGroup:
    """Live nodes of one model + KV geometry: dispatch books a pair inside one group."""

    group: str
    roles: str  # role letters present: 'p', 'd', 'm'
    nodes: dict[str, NodeInfo]  # node_id -> info

    def __len__(self) -> int:
        return len(self.nodes)


def split_member(member: bytes | str) -> tuple[str, str]:
    text = member.decode() if isinstance(member, bytes) else member
    node_id, _, incarnation = text.partition("|")
    return node_id, incarnation


def node_group(info: NodeInfo) -> str:
    return group_id(info.model_id, info.kv.compat_key)


class ClusterView:
    """A frontend's periodically refreshed snapshot of the registry."""

    def __init__(self, client: aioredis.Redis, keys: KeySchema) -> None:
        self._client = client
        self._keys = keys
        self.nodes: dict[str, NodeState] = {}
        self._infos: dict[str, NodeInfo] = {}
        self._members: dict[str, list[str]] = {}
        self._groups: dict[tuple[str, tuple[str, int, int, int, int]], tuple[CandidateGroup, int]] = {}

    async def refresh(self) -> dict[str, str]:
        """Re-read the leases (and descriptions of new nodes); returns {node_id: reason} for
        undecodable descriptions (the caller dead-letters them)."""
        leases: list[Any] = await self._client.zrange(self._keys.alive, 0, -1, withscores=True)
        latest: dict[str, tuple[str, int]] = {}
        for member, score in leases:
            node_id, incarnation = split_member(member)
            if node_id not in latest or score > latest[node_id][1]:
                latest[node_id] = (incarnation, int(score))
        self._members = {split_member(m)[0]: [] for m, _ in leases}
        for member, _score in leases:
            self._members[split_member(member)[0]].append(
                member.decode() if isinstance(member, bytes) else member
            )
        unknown = [
            n for n, (inc, _) in latest.items() if n not in self._infos or self._infos[n].incarnation != inc
        ]
        bad: dict[str, str] = {}
        if unknown:
            payloads: list[Any] = await self._client.hmget(self._keys.nodes, unknown)
            for node_id, payload in zip(unknown, payloads, strict=True):
                if payload is None:
                    continue  # registering right now; seen next time
                try:
                    self._infos[node_id] = decode(payload, NodeInfo)
                except MessageDecodeError as exc:
                    bad[node_id] = str(exc)
        self.nodes = {
            node_id: NodeState(self._infos[node_id], inc, expiry)
            for node_id, (inc, expiry) in latest.items()
            if node_id in self._infos and self._infos[node_id].incarnation == inc
        }
        for node_id in set(self._infos) - set(latest):
            del self._infos[node_id]
        self._index()
        return bad

    def _index(self) -> None:
        """Group the view once per refresh, so a dispatch never walks the whole cluster."""
        by_key: dict[tuple[str, tuple[str, int, int, int, int]], dict[str, NodeState]] = defaultdict(dict)
        for node_id, state in self.nodes.items():
            by_key[state.info.compat_key][node_id] = state
        self._groups = {}
        for key, states in by_key.items():
            members = {n: st.info for n, st in states.items()}
            roles = "".join(sorted({ROLE_LETTERS[i.role] for i in members.values()}))
            group = CandidateGroup(node_group(next(iter(members.values()))), roles, members)
            self._groups[key] = (group, max(st.lease_expiry_ms for st in states.values()))

    def members_of(self, node_id: str) -> list[str]:
        """Every lease member of ``node_id`` seen at the last refresh."""
        return self._members.get(node_id, [])

    def lease_of(self, node_id: str, incarnation: str) -> int | None:
        """Lease expiry of that incarnation, None when it is not registered (any more)."""
        state = self.nodes.get(node_id)
        return state.lease_expiry_ms if state is not None and state.incarnation == incarnation else None

    def candidate_groups(self, model_id: str, kv: KVGeometry | None, now_ms: int) -> list[CandidateGroup]:
        """Live nodes of ``model_id`` grouped by KV geometry, largest group first.

        Nodes pair only inside one group: different geometry means KV blocks are not byte-compatible.
        With ``kv`` given only that geometry's group is returned.
        """
        out = [
            group
            for (group_model, group_kv), (group, last_expiry_ms) in self._groups.items()
            if group_model == model_id
            and (kv is None or group_kv == kv.compat_key)
            and last_expiry_ms > now_ms
        ]
        return sorted(out, key=len, reverse=True)

    def expired_members(self, older_than_ms: int) -> list[str]:
        """Members whose lease lapsed before ``older_than_ms`` (reaped after a whole TTL)."""
        return [f"{n}|{s.incarnation}" for n, s in self.nodes.items() if s.lease_expiry_ms < older_than_ms]


async def booked_load(client: aioredis.Redis, keys: KeySchema) -> dict[str, dict[str, int]]:
    """Outstanding bookings per node (operators, tests): {node_id: {prefill_tokens, decode_requests}}.
    Reads the whole bookings ZSET: an inspection tool, never on the dispatch path."""
    out: dict[str, dict[str, int]] = {}
    members: list[Any] = await client.zrange(keys.bookings, 0, -1)
    for raw in members:
        parts = raw.decode("utf-8", "replace").split("|")
        if len(parts) != 7 or not parts[6].isdigit():
            continue  # the '~' keeper, or not a booking of ours (RELEASE skips it as well)
        kind, node_id, amount = parts[0], parts[2], int(parts[6])
        load = out.setdefault(node_id, {"prefill_tokens": 0, "decode_requests": 0})
        if kind == "p":
            load["prefill_tokens"] += amount
        elif kind == "d":
            load["decode_requests"] += 1
        else:  # a mixed node's one booking: prompt tokens + its decode slot
            load["prefill_tokens"] += amount - 1
            load["decode_requests"] += 1
    return out
