"""Live migration D1 -> D2: one record per request per side, its states and legal transitions.

The records use the hand-off's ``Record`` / ``Transitions`` (splitwise/instance/handoff_state.py):
owned by the instance's event loop, changed only through ``Transitions.move``; an illegal move is
logged, counted (``illegal_transitions``) and raised. A failure or a cancel is a transition.

Source side (D1 drives, ``migration_source.py``)::

    OFFERING --granted--> PRECOPYING --paused--> STOPPING --landed--> COMMITTING --committed--> COMMITTED
       |                      |                     |                     |
       +-refused-> FAILED     +------failure--------+--------failure------+--> ABORTING --fenced--> FAILED

    failure = refused | unreachable | not_landed | ended (the request finished / was cancelled /
              preempted meanwhile) | timeout; ABORTING resumes the request on D1 if it was paused
    fenced  = D1's initiator ``forget`` returned (none of its writes can land any more), then D2 is
              told to release (MigrateAbort); a commit D2 refused needs no more than that
    COMMITTED: D2 owns the request; D1 freed its blocks and released its booking, no terminal

Target side (D2 serves D1, ``migration_target.py``)::

    RESERVED --commit (every transfer DONE, admitted)--> ADMITTED
       |  +--aborted (D1 says it can no longer write)--> RELEASED
       +--peer_lost | timeout | refused commit--> FENCING --revoked--> RELEASED
                                                     +--unfenced--> QUARANTINED (blocks kept for good)
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from splitwise.instance.handoff_state import Record
from splitwise.instance.pd_channel import Connection


class SourceState(enum.Enum):
    OFFERING = "offering"  # asking D2 to reserve and expect
    PRECOPYING = "precopying"  # full blocks travel while D1 keeps decoding
    STOPPING = "stopping"  # paused in D1's engine: last blocks + sampler state
    COMMITTING = "committing"  # D2 admits it; D1's last tokens are in Redis already
    ABORTING = "aborting"  # failed before the commit: fencing D1's writes, D1 keeps the request
    COMMITTED = "committed"  # end: D2 owns it
    FAILED = "failed"  # end: the request stays (or ended) on D1


class TargetState(enum.Enum):
    RESERVED = "reserved"  # blocks reserved, the transport expects D1's writes
    FENCING = "fencing"  # D1 lost or timed out: revoking its access before releasing
    ADMITTED = "admitted"  # end: in D2's running batch, D2's node agent holds the work item
    RELEASED = "released"  # end: reservation released
    QUARANTINED = "quarantined"  # end: D1 could not be fenced; the blocks are never reused


_S = SourceState
SOURCE_MOVES: Mapping[SourceState, frozenset[SourceState]] = {
    _S.OFFERING: frozenset({_S.PRECOPYING, _S.FAILED, _S.ABORTING}),
    _S.PRECOPYING: frozenset({_S.STOPPING, _S.ABORTING}),
    _S.STOPPING: frozenset({_S.COMMITTING, _S.ABORTING}),
    _S.COMMITTING: frozenset({_S.COMMITTED, _S.ABORTING}),
    _S.ABORTING: frozenset({_S.FAILED}),
    _S.COMMITTED: frozenset(),
    _S.FAILED: frozenset(),
}

_T = TargetState
TARGET_MOVES: Mapping[TargetState, frozenset[TargetState]] = {
    _T.RESERVED: frozenset({_T.ADMITTED, _T.RELEASED, _T.FENCING}),
    _T.FENCING: frozenset({_T.RELEASED, _T.QUARANTINED}),
    _T.ADMITTED: frozenset(),
    _T.RELEASED: frozenset(),
    _T.QUARANTINED: frozenset(),
}


def transfer_id(req_id: str, round_index: int) -> str:
    """The transport's request key for one copy round (each round is its own transfer, so D1 learns
    when a round landed before the next one starts)."""
    return f"{req_id}~mig{round_index}"


@dataclass(frozen=True)
class MigrationOutcome:
    """What ``NodeRuntime.migrate_out`` returns. ``ok``: the target owns the request now."""

    req_id: str
    ok: bool
    source: str
    target: str
    reason: str  # why it was migrated (manual, drain, balance, make_room)
    error: str = ""  # why it failed ("" when ok)
    pause_ms: float = 0.0  # paused in the source's engine until the target acknowledged the commit
    num_blocks: int = 0  # KV blocks copied (all rounds)
    num_rounds: int = 0  # copy rounds (pre-copy rounds + the final one)


@dataclass
class SourceRecord(Record[SourceState]):
    target_id: str = ""
    why: str = ""  # the trigger (manual, drain, ...)
    protocol: str = ""
    dst_block_ids: list[int] = field(default_factory=list)
    transfer_ids: list[str] = field(default_factory=list)  # rounds used (finished on the initiator)
    num_blocks: int = 0
    conn: Connection | None = None
    paused: bool = False
    cancelled: bool = False  # the frontend cancelled it meanwhile: never commit
    ended: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class TargetRecord(Record[TargetState]):
    protocol: str = ""
    dst_block_ids: list[int] = field(default_factory=list)
    transfer_ids: list[str] = field(default_factory=list)  # every round id the target expects
    timer: asyncio.Task[None] | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set once the record is forgotten
