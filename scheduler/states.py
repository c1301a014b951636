"""The request state machines of the scheduler's two sides, and their one transition function.

Frontend side (``FrontendRecord``, one per accepted request)::

    DISPATCHING --queued--> QUEUED --first token--> RUNNING
        ^                     |                       |
        |                 node lost / retryable error (re-dispatch)
        |                     v                       v
        +----- placed ---- PENDING (waiting for capacity, resumes with the tokens delivered)
    any non-terminal --finish/fail/expire/cancel/close--> FINISHED | FAILED | EXPIRED | CANCELLED

Node side (``HeldWork``, one per work item a node took)::

    RECEIVED --decoding--> RUNNING --terminal published--> ANSWERED --ack--> (forgotten)
    RECEIVED/RUNNING --cancel--> CANCELLED --ack--> (forgotten)
    RECEIVED/RUNNING --frontend lease lapsed--> ORPHANED --ack--> (forgotten)
    RUNNING --migrated (live migration committed: another node owns it)--> MIGRATED --ack--> (forgotten)

``transition`` is the only place a state changes. An illegal transition is logged and counted
(``illegal_transitions``) and leaves the state as it was: never silent, never a crash.
"""

from __future__ import annotations

import enum
from typing import Protocol, TypeVar

from scheduler.metrics import Counters
from splitwise.logging import get_logger

log = get_logger("scheduler.states")


class FrontendState(enum.Enum):
    DISPATCHING = "dispatching"
    QUEUED = "queued"
    RUNNING = "running"
    PENDING = "pending"
    FINISHED = "finished"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


# The state a request's terminal result message (by its TYPE) ends it in on the frontend.
FRONTEND_TERMINAL_STATES = {
    "finished": FrontendState.FINISHED,
    "error": FrontendState.FAILED,
    "expired": FrontendState.EXPIRED,
    "cancelled": FrontendState.CANCELLED,
}


class NodeState(enum.Enum):
    RECEIVED = "received"
    RUNNING = "running"
    ANSWERED = "answered"
    CANCELLED = "cancelled"
    ORPHANED = "orphaned"
    MIGRATED = "migrated"  # a live migration moved it to another node, which answers for it


_FE = FrontendState
_FE_TERMINAL = frozenset({_FE.FINISHED, _FE.FAILED, _FE.EXPIRED, _FE.CANCELLED})
_FE_LIVE = frozenset(set(_FE) - _FE_TERMINAL)
FRONTEND_TRANSITIONS: dict[FrontendState, frozenset[FrontendState]] = {
    _FE.DISPATCHING: frozenset({_FE.QUEUED, _FE.PENDING}) | _FE_TERMINAL,
    _FE.QUEUED: frozenset({_FE.RUNNING, _FE.PENDING}) | _FE_TERMINAL,
    _FE.RUNNING: frozenset({_FE.PENDING}) | _FE_TERMINAL,
    _FE.PENDING: frozenset({_FE.QUEUED}) | _FE_TERMINAL,
    **{s: frozenset() for s in _FE_TERMINAL},
}

_N = NodeState
NODE_TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    _N.RECEIVED: frozenset({_N.RUNNING, _N.ANSWERED, _N.CANCELLED, _N.ORPHANED}),
    _N.RUNNING: frozenset({_N.ANSWERED, _N.CANCELLED, _N.ORPHANED, _N.MIGRATED}),
    _N.ANSWERED: frozenset(),
    _N.MIGRATED: frozenset(),
    _N.CANCELLED: frozenset({_N.ANSWERED}),  # a terminal may still go out after a cancel raced it
    _N.ORPHANED: frozenset(),
}

S = TypeVar("S", FrontendState, NodeState)


class Stateful(Protocol[S]):
    state: S

    @property
    def req_id(self) -> str: ...


def is_terminal(state: FrontendState) -> bool:
    return state in _FE_TERMINAL


def is_live(state: FrontendState) -> bool:
    return state in _FE_LIVE


def transition(
    record: Stateful[S], new: S, table: dict[S, frozenset[S]], stats: Counters, *, why: str
) -> bool:
    """Move ``record`` to ``new`` if the table allows it; else log + count and return False."""
    old = record.state
    if new in table[old]:
        record.state = new
        return True
    stats.inc("illegal_transitions")
    log.error("illegal_transition", req_id=record.req_id, state=old.value, to=new.value, why=why)
    return False
