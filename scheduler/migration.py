"""Live migration, the scheduler's part: who may take a request, and how to ask a node to move one.

    splitwise migrate REQ [--to N] -> send_migrate: a MigrateCommand on every decode node's control
        stream (only the node running REQ acts on it)
    source node -> decode_peers + pick_target: a live decode node of the same model and KV geometry,
        not the source, the one with the most free KV blocks (then the fewest running requests)

The node itself runs the migration (splitwise/instance/migration_source.py); the frontend learns
the new owner from the target's ``Migrated`` message on its results stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from scheduler.errors import MessageDecodeError
from scheduler.keys import KeySchema
from scheduler.messages import LoadReport, MigrateCommand, NodeInfo, decode, encode
from scheduler.registry import node_group, split_member
from splitwise.codes import Role


@dataclass(frozen=True)
class Peer:
    info: NodeInfo
    load: LoadReport


async def decode_peers(client: aioredis.Redis, keys: KeySchema) -> list[Peer]:
    """Every decode node whose current incarnation's lease is live now and that is not draining or
    switching role, with its last load report."""
    server_s, server_us = await client.time()
    now_ms = int(server_s) * 1000 + int(server_us) // 1000
    leases: list[Any] = await client.zrange(keys.alive, 0, -1, withscores=True)
    live = {split_member(m) for m, score in leases if int(score) > now_ms}
    payloads: dict[Any, Any] = await client.hgetall(keys.nodes)
    peers = []
    for payload in payloads.values():
        try:
            info: NodeInfo = decode(payload, NodeInfo)
        except MessageDecodeError:
            continue  # the frontends dead-letter it
        if info.role is not Role.DECODE or (info.node_id, info.incarnation) not in live:
            continue
        fields: dict[Any, Any] = await client.hgetall(keys.heartbeat(info.node_id))
        if fields.get(b"state", b"serving") != b"serving":
            continue  # draining or switching role (scheduler.node_commands): takes no new work
        load = LoadReport.from_fields({k.decode(): v.decode() for k, v in fields.items()})
        peers.append(Peer(info, load))
    return sorted(peers, key=lambda p: p.info.node_id)


def pick_target(source: NodeInfo, peers: list[Peer], wanted: str | None = None) -> Peer | None:
    """The node to migrate to: ``wanted`` if it is a live compatible decode node, else (no
    ``wanted``) the compatible one with the most free KV blocks, then the fewest running requests."""
    group = node_group(source)
    fits = [p for p in peers if p.info.node_id != source.node_id and node_group(p.info) == group]
    if wanted:
        return next((p for p in fits if p.info.node_id == wanted), None)
    if not fits:
        return None
    return max(fits, key=lambda p: (p.load.free_kv_blocks, -p.load.running_requests, p.info.node_id))


async def send_migrate(
    client: aioredis.Redis,
    keys: KeySchema,
    command: MigrateCommand,
    *,
    node_ids: list[str],
    ttl_ms: int,
    maxlen: int,
) -> None:
    """Queue ``command`` on the control stream of each of ``node_ids`` (one pipeline)."""
    payload = encode(command)
    pipe = client.pipeline(transaction=False)
    for node_id in node_ids:
        key = keys.control(node_id)
        pipe.xadd(key, {"m": payload}, maxlen=maxlen, approximate=True)
        pipe.pexpire(key, ttl_ms)
    await pipe.execute()
