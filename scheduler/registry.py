"""The cluster as a frontend sees it: registered nodes, their liveness, incarnation and load.

FastDeploy re-reads the whole cluster hash on every dispatch; we refresh this view once per
heartbeat interval (one HGETALL plus one pipelined HMGET per node) and let the dispatch script
re-check liveness of the few candidates it scores.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import redis.asyncio as aioredis

from scheduler.errors import MessageDecodeError
from scheduler.keys import KeySchema
from scheduler.messages import KVGeometry, LoadReport, NodeInfo, decode
from splitwise.logging import get_logger

log = get_logger("scheduler.registry")

_HB_FIELDS = ("incarnation", "ts_ms", *LoadReport.__dataclass_fields__)


@dataclass(frozen=True)
class NodeState:
    info: NodeInfo
    alive: bool
    incarnation: str
    heartbeat_ms: int
    load: LoadReport


def parse_heartbeat(info: NodeInfo, values: list[bytes | None]) -> NodeState:
    fields = {name: (v.decode() if v is not None else "") for name, v in zip(_HB_FIELDS, values, strict=True)}
    alive = bool(fields["incarnation"])
    return NodeState(
        info=info,
        alive=alive,
        incarnation=fields["incarnation"],
        heartbeat_ms=int(fields["ts_ms"] or 0),
        load=LoadReport.from_fields(fields),
    )


async def read_cluster(
    client: aioredis.Redis, keys: KeySchema
) -> tuple[dict[str, NodeState], dict[str, str]]:
    """All registered nodes with their heartbeat state, plus {node_id: reason} for undecodable entries."""
    raw: dict[bytes, bytes] = await client.hgetall(keys.nodes)  # type: ignore[assignment]
    infos: dict[str, NodeInfo] = {}
    bad: dict[str, str] = {}
    for node_id_b, payload in raw.items():
        node_id = node_id_b.decode()
        try:
            infos[node_id] = decode(payload, NodeInfo)
        except MessageDecodeError as exc:
            bad[node_id] = str(exc)
    pipe = client.pipeline(transaction=False)
    for node_id in infos:
        pipe.hmget(keys.heartbeat(node_id), list(_HB_FIELDS))
    results = await pipe.execute() if infos else []
    states = {
        node_id: parse_heartbeat(info, values)
        for (node_id, info), values in zip(infos.items(), results, strict=True)
    }
    return states, bad


class ClusterView:
    """A frontend's periodically refreshed snapshot of the registry."""

    def __init__(self, client: aioredis.Redis, keys: KeySchema) -> None:
        self._client = client
        self._keys = keys
        self.nodes: dict[str, NodeState] = {}

    async def refresh(self) -> dict[str, str]:
        """Re-read the registry; returns undecodable node entries (the caller dead-letters them)."""
        self.nodes, bad = await read_cluster(self._client, self._keys)
        return bad

    def is_serving(self, node_id: str, incarnation: str) -> bool:
        state = self.nodes.get(node_id)
        return state is not None and state.alive and state.incarnation == incarnation

    def candidate_groups(self, model_id: str, kv: KVGeometry | None) -> list[list[NodeInfo]]:
        """Live nodes of ``model_id`` grouped by KV geometry, largest group first.

        Nodes pair only inside one group: different geometry means KV blocks are not byte-compatible.
        With ``kv`` given only that geometry's group is returned.
        """
        groups: dict[tuple[str, int, int, int, int], list[NodeInfo]] = defaultdict(list)
        for state in self.nodes.values():
            if (
                state.alive
                and state.info.model_id == model_id
                and (kv is None or state.info.kv.compat_key == kv.compat_key)
            ):
                groups[state.info.kv.compat_key].append(state.info)
        return sorted(groups.values(), key=len, reverse=True)
