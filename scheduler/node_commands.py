"""A node's operational status (serving, draining, switching) and the node commands it takes.

    operator / planner --XADD DrainRequest | RoleChangeRequest--> {t}:ctl:<node>
    NodeReader (same XREAD as cancels) -> NodeAgent -> NodeCommands.receive
        -> dropped when meant for another incarnation (a restarted node reads its stream from 0)
        -> else handed to the instance's handler (splitwise/instance/drain.py), or kept until it is set
    NodeAgent.set_status(draining | switching): the node leaves its candidate set at once (ZREM) and
        its heartbeat hash shows the status; every later beat keeps it out (the heartbeat's 'n' flag)

``send_command`` is the writer side (the CLI's ``splitwise drain`` / ``splitwise role`` and the
planner): it checks the node is registered and addresses its current incarnation.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from scheduler.errors import SchedulerError
from scheduler.keys import KeySchema
from scheduler.messages import DrainRequest, NodeCommand, NodeInfo, RoleChangeRequest, decode, encode
from scheduler.metrics import Counters
from splitwise.codes import Role
from splitwise.logging import get_logger

log = get_logger("scheduler.node_commands")

CommandHandler = Callable[[NodeCommand], None]
_MAX_KEPT = 16  # commands read before the instance set its handler (start-up): a small bounded list


class Activity(enum.StrEnum):
    SERVING = "serving"
    DRAINING = "draining"  # leaving: finishing or moving its work, then deregisters and exits
    SWITCHING = "switching"  # draining to change its role in place, then registers again


@dataclass(frozen=True)
class NodeStatus:
    activity: Activity = Activity.SERVING
    reason: str = ""
    requested_by: str = ""
    since_ms: int = 0
    target_role: str = ""  # switching: the role it becomes

    @property
    def is_candidate(self) -> bool:
        """Dispatch may pick this node (it is in its candidate set)."""
        return self.activity is Activity.SERVING

    def to_fields(self) -> dict[str, str]:
        """The heartbeat hash fields `splitwise inspect` shows."""
        return {
            "state": self.activity.value,
            "state_reason": self.reason,
            "state_by": self.requested_by,
            "state_since_ms": str(self.since_ms),
            "state_target_role": self.target_role,
        }


class UnknownNodeError(SchedulerError):
    """A command for a node id that is not registered (or whose lease lapsed)."""


class NodeCommands:
    """The node side: filters commands by incarnation and hands them to the instance."""

    def __init__(self, stats: Counters) -> None:
        self.stats = stats
        self.status = NodeStatus()  # replaced whole; the heartbeat thread reads it
        self._handler: CommandHandler | None = None
        self._kept: list[NodeCommand] = []

    def set_handler(self, handler: CommandHandler) -> None:
        self._handler = handler
        kept, self._kept = self._kept, []
        for command in kept:
            handler(command)

    def receive(self, command: NodeCommand, incarnation: str) -> None:
        if command.incarnation != incarnation:
            self.stats.inc("commands_stale")
            log.info("node_command_stale", command=command.TYPE, incarnation=command.incarnation)
            return
        self.stats.inc("commands_received")
        log.info(
            "node_command_received",
            command=command.TYPE,
            reason=command.reason,
            requested_by=command.requested_by,
            grace_s=command.grace_s,
        )
        if self._handler is not None:
            self._handler(command)
        elif len(self._kept) < _MAX_KEPT:
            self._kept.append(command)


async def apply_status(
    client: aioredis.Redis, keys: KeySchema, node_id: str, candidates_key: str, member: str, ttl_ms: int
) -> None:
    """What ``set_status`` writes at once (the beats repeat it): out of dispatch, status shown."""
    pipe = client.pipeline(transaction=False)
    pipe.zrem(candidates_key, member)
    pipe.pexpire(keys.heartbeat(node_id), ttl_ms)
    await pipe.execute()


async def booked_prompt_tokens(client: aioredis.Redis, keys: KeySchema, member: str) -> int:
    """Prompt tokens booked on ``member`` (node|incarnation) as a prefill node: the bookings ZSET
    (``p|group|node|incarnation|req_id|attempt|amount``). Reads the whole set: drains only."""
    total = 0
    raw: list[Any] = await client.zrange(keys.bookings, 0, -1)
    for entry in raw:
        parts = entry.decode("utf-8", "replace").split("|")
        if len(parts) == 7 and parts[0] == "p" and f"{parts[2]}|{parts[3]}" == member and parts[6].isdigit():
            total += int(parts[6])
    return total


def _server_ms(client: redis.Redis) -> int:
    server_s, server_us = client.time()
    return int(server_s) * 1000 + int(server_us) // 1000


def node_info(client: redis.Redis, keys: KeySchema, node_id: str) -> NodeInfo:
    """The registered, live description of ``node_id``. Raises UnknownNodeError."""
    payload: Any = client.hget(keys.nodes, node_id)
    if payload is None:
        raise UnknownNodeError(f"node {node_id!r} is not registered (topic {keys.topic!r})")
    info: NodeInfo = decode(payload, NodeInfo)
    lease: Any = client.zscore(keys.alive, f"{node_id}|{info.incarnation}")
    if lease is None or lease <= _server_ms(client):
        raise UnknownNodeError(f"node {node_id!r} is registered but its lease lapsed (not running?)")
    return info


def send_command(
    client: redis.Redis,
    keys: KeySchema,
    node_id: str,
    *,
    role: Role | None,
    reason: str,
    requested_by: str,
    grace_s: float,
    ttl_ms: int,
    stream_maxlen: int = 10_000,
) -> NodeCommand:
    """Write a DrainRequest (``role`` None) or a RoleChangeRequest to the node's control stream
    (synchronous: the CLI and the planner's thread call it). Raises UnknownNodeError, ValueError
    (a negative grace period), redis errors."""
    if grace_s < 0:
        raise ValueError(f"--grace-period: {grace_s} must be >= 0 seconds")
    info = node_info(client, keys, node_id)
    fields: dict[str, Any] = dict(
        command_id=uuid.uuid4().hex[:16],
        incarnation=info.incarnation,
        reason=reason,
        requested_by=requested_by,
        grace_s=float(grace_s),
        issued_ms=_server_ms(client),
    )
    command: NodeCommand = (
        DrainRequest(**fields) if role is None else RoleChangeRequest(**fields, role=Role(role))
    )
    key = keys.control(node_id)
    pipe = client.pipeline(transaction=False)
    pipe.xadd(key, {"m": encode(command)}, maxlen=stream_maxlen, approximate=True)
    pipe.pexpire(key, ttl_ms)
    pipe.execute()
    log.info("node_command_sent", node_id=node_id, command=command.TYPE, reason=reason, by=requested_by)
    return command
