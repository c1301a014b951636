"""The planner's snapshot of the cluster, read from Redis in one pass (sync client: the planner's
own thread). Per live node: its role (NodeInfo), its LoadReport (``{t}:hb:<node>``) and the prompt
tokens booked on it (its score in its prefill candidate set, ``{t}:cand:<group>:p``).

A node is live when its lease member's incarnation is the one its NodeInfo names and the lease has
not expired (server time). Prefill and decode nodes only: mixed nodes are neither side's capacity.
A node whose heartbeat ``state`` says it is leaving its role (``draining``, ``switching``: the
drain and role commands) is not counted: it takes no new work.
"""

from __future__ import annotations

from typing import Any

import redis

from scheduler.errors import MessageDecodeError
from scheduler.keys import ROLE_LETTERS, KeySchema
from scheduler.messages import LoadReport, NodeInfo, decode
from scheduler.poison import parse_int
from scheduler.registry import node_group, split_member
from splitwise.codes import Role
from splitwise.planner.policy import NodeSignals, Signals

LEAVING = frozenset({"draining", "switching"})


def read_signals(client: redis.Redis, keys: KeySchema) -> Signals:
    infos = _live_infos(client, keys)
    pipe = client.pipeline(transaction=False)
    for info in infos:
        pipe.hgetall(keys.heartbeat(info.node_id))
        member = f"{info.node_id}|{info.incarnation}"
        pipe.zscore(keys.candidates(node_group(info), ROLE_LETTERS[info.role]), member)
    answers: list[Any] = pipe.execute(raise_on_error=False)
    nodes = []
    for i, info in enumerate(infos):
        hb, score = answers[2 * i], answers[2 * i + 1]
        fields = (
            {k.decode(): v.decode("utf-8", "replace") for k, v in hb.items()} if isinstance(hb, dict) else {}
        )
        if fields.get("state", "serving") in LEAVING:
            continue
        load = LoadReport.from_fields(
            {n: str(parse_int(fields.get(n, 0))) for n in LoadReport.__dataclass_fields__}
        )
        booked = int(score) if isinstance(score, float | int) and info.role == Role.PREFILL else 0
        total = info.kv.num_blocks  # 0: unknown (a simulated node), so no KV signal
        nodes.append(
            NodeSignals(
                node_id=info.node_id,
                role=info.role,
                queued_prefill_tokens=load.queued_prefill_tokens,
                booked_prefill_tokens=max(0, booked),
                running_requests=load.running_requests,
                waiting_requests=load.waiting_requests,
                kv_usage=round(max(0.0, 1 - load.free_kv_blocks / total), 4) if hb and total > 0 else 0.0,
                ttft_p90_ms=float(load.ttft_p90_ms),
                itl_p90_ms=float(load.itl_p90_ms),
                latency_samples=load.latency_samples,
            )
        )
    return Signals(tuple(nodes))


def _live_infos(client: redis.Redis, keys: KeySchema) -> list[NodeInfo]:
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.zrange(keys.alive, 0, -1, withscores=True)
    pipe.hgetall(keys.nodes)
    answers: list[Any] = pipe.execute(raise_on_error=False)
    server, members, descriptions = answers
    if isinstance(server, Exception):
        raise server
    now_ms = int(server[0]) * 1000 + int(server[1]) // 1000
    leases: dict[str, tuple[str, float]] = {}
    for member, expiry in members if isinstance(members, list) else []:
        node_id, incarnation = split_member(member)
        if node_id not in leases or expiry > leases[node_id][1]:
            leases[node_id] = (incarnation, expiry)
    infos = []
    for raw in (descriptions if isinstance(descriptions, dict) else {}).values():
        try:
            info = decode(raw, NodeInfo)
        except MessageDecodeError:
            continue  # frontends dead-letter it; the planner only skips it
        incarnation, expiry = leases.get(info.node_id, ("", 0.0))
        if info.role != Role.MIXED and incarnation == info.incarnation and expiry > now_ms:
            infos.append(info)
    return sorted(infos, key=lambda i: i.node_id)
