"""The P/D hand-off's per-request records: one state enum per side and its legal transitions.

Each side keeps ONE record per request (``DecodeRecord`` on D, ``PrefillRecord`` on P), owned by
the instance's event loop. Its state changes only through ``Transitions.move``, which checks the
table below and rejects anything else: the rejection is logged, counted (``illegal_transitions``
in the instance's transfer events) and raised as ``IllegalTransitionError``, never silent.
Cancellation, timeout, fallback and a lost peer are transitions (events), not flags.

Decode side (D drives), events on the arrows::

    RESERVING --reserved--> PREFILLING --landed--> LANDED --admitted--> ADMITTED (engine owns it)
      |  |                   |  |  |                 |  |
      |  +-refused-> FAILED  |  |  |                 |  +-refused (admit failed)--> FAILED
      +-cancel-> CANCELLED   |  |  |                 +-cancel-> CANCELLED (every write landed)
                             |  |  +-cancel|shutdown-> CANCELLING --fenced--> CANCELLED
                             |  +-failure, --pd-fallback local-> FALLING_BACK --fenced--> FELL_BACK
                             +-failure, --pd-fallback fail-> FAILING --fenced--> FAILED

    CANCELLING | FALLING_BACK | FAILING --unfenced--> QUARANTINED

    failure = prefill_failed | timeout | peer_lost | unreachable | not_landed | refused
    fenced = p_stopped (P acknowledged the cancel after its transport's forget returned, or was
             never sent the task) | revoked (no acknowledgement: the target revoked P's access
             and confirmed it); the reservation is released
    unfenced = no acknowledgement and the revoke could not be confirmed (ipc with a wedged P):
             the blocks stay reserved for good (``reservations_quarantined``)

Prefill side (P serves D)::

    CONNECTING --connected--> PREFILLING --computed--> DRAINING --landed--> SHIPPED
         |                        |                       |
         +-------cancel-----------+--------cancel---------+--> CANCELLED (no reply, blocks freed)
         +-------failed-----------+--------failed---------+--> FAILED (PrefillFailed to D)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from splitwise.counters import Counters
from splitwise.errors import SplitwiseError
from splitwise.logging import get_logger

log = get_logger(__name__)

S = TypeVar("S", bound=enum.Enum)


class IllegalTransitionError(SplitwiseError):
    """A hand-off record was asked to move where its state machine does not allow (a bug)."""

    retryable = False


class DecodeState(enum.Enum):
    RESERVING = "reserving"  # waiting for KV blocks (bounded queue)
    PREFILLING = "prefilling"  # blocks reserved, target expects them, P was (or is being) asked
    LANDED = "landed"  # P answered and D's target confirmed every write
    ADMITTED = "admitted"  # in the engine's running batch: the engine owns it now (end)
    CANCELLING = "cancelling"  # cancelled mid-transfer: waiting until P can no longer write
    FALLING_BACK = "falling_back"  # prefilled locally; the old reservation waits for P to stop
    FAILING = "failing"  # failed (--pd-fallback fail); the reservation waits for P to stop
    CANCELLED = "cancelled"  # end: nothing of it is left here
    FELL_BACK = "fell_back"  # end: the local request runs in the engine, reservation released
    FAILED = "failed"  # end: the request failed with an explicit error
    QUARANTINED = "quarantined"  # end: P could not be fenced; its reservation is never reused


class PrefillState(enum.Enum):
    CONNECTING = "connecting"  # transport connect to D (once per peer)
    PREFILLING = "prefilling"  # in the engine; each layer ships as it is computed
    DRAINING = "draining"  # computed; finish notice sent, waiting for D's landed verdict
    SHIPPED = "shipped"  # end: D confirmed every write, P's blocks are free
    CANCELLED = "cancelled"  # end: D or the client gave up
    FAILED = "failed"  # end: compute or transfer failed (D falls back or fails)


_D = DecodeState
DECODE_MOVES: Mapping[DecodeState, frozenset[DecodeState]] = {
    _D.RESERVING: frozenset({_D.PREFILLING, _D.CANCELLED, _D.FAILED}),
    _D.PREFILLING: frozenset({_D.LANDED, _D.CANCELLING, _D.FALLING_BACK, _D.FAILING}),
    _D.LANDED: frozenset({_D.ADMITTED, _D.CANCELLED, _D.FAILED}),
    _D.CANCELLING: frozenset({_D.CANCELLED, _D.QUARANTINED}),
    _D.FALLING_BACK: frozenset({_D.FELL_BACK, _D.QUARANTINED}),
    _D.FAILING: frozenset({_D.FAILED, _D.QUARANTINED}),
    _D.ADMITTED: frozenset(),
    _D.CANCELLED: frozenset(),
    _D.FELL_BACK: frozenset(),
    _D.FAILED: frozenset(),
    _D.QUARANTINED: frozenset(),
}
# States in which this flow (not the engine) owns the request's cleanup: a cancel is ours.
DECODE_OWNS_CLEANUP = frozenset({_D.RESERVING, _D.PREFILLING, _D.LANDED, _D.CANCELLING, _D.FAILING})

_P = PrefillState
PREFILL_MOVES: Mapping[PrefillState, frozenset[PrefillState]] = {
    _P.CONNECTING: frozenset({_P.PREFILLING, _P.CANCELLED, _P.FAILED}),
    _P.PREFILLING: frozenset({_P.DRAINING, _P.CANCELLED, _P.FAILED}),
    _P.DRAINING: frozenset({_P.SHIPPED, _P.CANCELLED, _P.FAILED}),
    _P.SHIPPED: frozenset(),
    _P.CANCELLED: frozenset(),
    _P.FAILED: frozenset(),
}


@dataclass
class Record(Generic[S]):
    """One request on one side. ``history`` keeps (event, state) for logs and tests."""

    req_id: str
    state: S
    peer_id: str = ""
    reason: str = ""  # why it left the happy path (cancel reason, failure), for logs and errors
    history: list[tuple[str, S]] = field(default_factory=list)

    def is_in(self, *states: S) -> bool:
        return self.state in states


class Transitions(Generic[S]):
    """The one place a record of one side changes state."""

    def __init__(self, side: str, moves: Mapping[S, frozenset[S]], counters: Counters) -> None:
        self.side = side
        self.moves = moves
        self.counters = counters

    def can_move(self, record: Record[S], new: S) -> bool:
        return new in self.moves[record.state]

    def move(self, record: Record[S], new: S, event: str, reason: str = "") -> None:
        """Move ``record`` to ``new`` because of ``event``; IllegalTransitionError if not allowed."""
        old = record.state
        if new not in self.moves[old]:
            self.counters.inc("illegal_transitions")
            log.error(
                "illegal hand-off transition rejected",
                side=self.side,
                req_id=record.req_id,
                state=old.value,
                to=new.value,
                hand_off_event=event,
            )
            raise IllegalTransitionError(
                f"{self.side} hand-off of {record.req_id}: {old.value} -> {new.value} on {event!r} is not allowed"
            )
        record.state = new
        if reason:
            record.reason = reason
        record.history.append((event, new))
        log.debug(
            "hand-off transition", side=self.side, req_id=record.req_id, state=new.value, hand_off_event=event
        )
