"""The node side's request record (``HeldWork``) and what its loop publishes for the heartbeat thread."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

from scheduler import scripts
from scheduler.config import SchedulerConfig
from scheduler.keys import ROLE_LETTERS, KeySchema, group_id
from scheduler.messages import LoadReport, NodeInfo, WorkItem
from scheduler.states import NodeState


@dataclass
class HeldWork:
    """One work item this node took: the node side's request record (see scheduler.states)."""

    item: WorkItem
    state: NodeState = NodeState.RECEIVED
    released: set[str] = field(default_factory=set)  # booking members this node already released

    @property
    def req_id(self) -> str:
        return self.item.req_id


@dataclass(frozen=True)
class BeatSnapshot:
    """What the loop publishes for the heartbeat thread (replaced whole, never mutated)."""

    load: LoadReport = field(default_factory=LoadReport)
    frontend_ids: tuple[str, ...] = ()
    last_work_id: str = ""
    last_control_id: str = ""


def drop_reason(item: WorkItem, incarnation: str, cancelled_attempt: int, now_ms: int) -> str | None:
    """Why a node must not take ``item`` (None: take it). ``cancelled_attempt``: the highest attempt
    of this request cancelled here (-1: none)."""
    if item.assignment.decode_incarnation != incarnation:
        return "stale_incarnation"  # sent to our previous life; its frontend re-dispatches it
    if cancelled_attempt >= item.attempt:
        return "cancelled"
    if now_ms >= item.deadline_ms:
        return "expired"
    return None


@dataclass(frozen=True)
class BeatArgs:
    """Who beats: the registration and its status fields (scheduler.node_commands.NodeStatus)."""

    info: NodeInfo
    member: str  # node_id|incarnation
    info_payload: bytes  # the encoded NodeInfo, written on (re-)registration
    status: dict[str, str]


def full_beat(
    client: redis.Redis,
    keys: KeySchema,
    config: SchedulerConfig,
    beat: BeatArgs,
    snap: BeatSnapshot,
    flags: str,
    server_now_ms: int,
) -> tuple[int, int, int]:
    """The HEARTBEAT script (heartbeat thread): (re-)registration, load report and status, stream
    trimming, TTLs, server time. Returns (registered, lease expiry ms, measured server ms)."""
    info = beat.info
    unit = scripts.DECODE_BOOKING_UNIT if info.role == "decode" else 0
    fields = [v for pair in [*snap.load.to_fields().items(), *beat.status.items()] for v in pair]
    candidates = keys.candidates(group_id(info.model_id, info.kv.compat_key), ROLE_LETTERS[info.role])
    node_keys = [keys.heartbeat(info.node_id), keys.work(info.node_id), keys.control(info.node_id)]
    registered, expiry, measured = scripts.HEARTBEAT.call_sync(
        client,
        [keys.nodes, keys.alive, candidates, *node_keys],
        [
            info.node_id,
            beat.member,
            beat.info_payload,
            config.dead_after_ms,
            config.ttl_ms,
            flags,
            unit,
            snap.load.free_kv_blocks,
            snap.last_work_id,
            snap.last_control_id,
            server_now_ms,
            *fields,
        ],
    )
    return int(registered), int(expiry), int(measured)
