"""The node side's request record (``HeldWork``) and what its loop publishes for the heartbeat thread."""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.messages import LoadReport, WorkItem
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
