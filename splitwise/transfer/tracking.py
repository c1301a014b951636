"""Per-request bookkeeping shared by the stream transports (tcp, ipc) on both sides.

Target side, one entry per expected request::

    expect ──> PENDING ──(write frames counted; finish with a matching count)──> DONE
                  │
                  └──(refused write | count mismatch | connection lost | deadline | close)──> FAILED

A request is bound to the first connection that writes, begins or finishes it; a frame for it on
another connection is refused, and losing the bound connection fails it. Every failure is logged
and counted here, once, at the transition.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from scheduler.clock import SYSTEM_CLOCK, Clock
from splitwise.counters import Counters
from splitwise.logging import get_logger
from splitwise.transfer.base import DONE, PENDING, TransferStatus, failed
from splitwise.transfer.errors import TransferError, UnexpectedBlocksError

log = get_logger("splitwise.transfer")

# The project's one Clock (scheduler.clock): tests inject a fake. A bare monotonic function is
# still accepted (the older form of this parameter).
AnyClock = Clock | Callable[[], float]


def _monotonic(clock: AnyClock) -> Callable[[], float]:
    return clock.monotonic if isinstance(clock, Clock) else clock


@dataclass
class _Expected:
    dst_block_ids: frozenset[int]
    deadline: float | None
    status: TransferStatus = PENDING
    conn_id: int | None = None
    num_block_writes: int = 0


class TargetRequests:
    """D's table of expected requests. Thread-safe; every method is non-blocking."""

    def __init__(self, protocol: str, counters: Counters, clock: AnyClock = SYSTEM_CLOCK) -> None:
        self._protocol = protocol
        self._counters = counters
        self._clock = _monotonic(clock)
        self._lock = threading.Lock()
        self._requests: dict[str, _Expected] = {}

    def expect(self, req_id: str, dst_block_ids: Sequence[int], timeout_s: float | None) -> None:
        deadline = None if timeout_s is None else self._clock() + timeout_s
        with self._lock:
            if req_id in self._requests:
                raise TransferError("request already expected; forget it first", req_id=req_id)
            self._requests[req_id] = _Expected(frozenset(dst_block_ids), deadline)

    def admit(self, req_id: str, conn_id: int, dst_block_ids: Sequence[int] = ()) -> frozenset[int]:
        """Check that ``conn_id`` may write ``dst_block_ids`` of ``req_id``; bind the request to it and
        return every block reserved for it. Raises UnexpectedBlocksError (and fails the request when
        it exists) otherwise."""
        with self._lock:
            entry = self._live(req_id)
            if entry is None:
                raise UnexpectedBlocksError("write for a request this target does not expect", req_id=req_id)
            if entry.status is not PENDING:
                reason = f"write for a request that is already {entry.status.state.value}"
                raise UnexpectedBlocksError(reason, req_id=req_id, block_ids=list(dst_block_ids))
            if entry.conn_id is not None and entry.conn_id != conn_id:
                reason = "request written from two connections"
            else:
                stray = sorted(set(dst_block_ids) - entry.dst_block_ids)
                if not stray:
                    entry.conn_id = conn_id
                    return entry.dst_block_ids
                reason = f"write to blocks not reserved for the request: {stray[:8]}"
            self._fail_locked(req_id, entry, reason)
        raise UnexpectedBlocksError(reason, req_id=req_id, block_ids=list(dst_block_ids))

    def landed(self, req_id: str, num_blocks: int) -> None:
        with self._lock:
            entry = self._requests.get(req_id)
            if entry is not None and entry.status is PENDING:
                entry.num_block_writes += num_blocks

    def finish(
        self, req_id: str, conn_id: int, num_block_writes: int, *, count_writes: bool
    ) -> TransferStatus:
        """P's completion notice. ``count_writes``: the transport saw every write (tcp) and the count
        must match; one-sided transports (ipc) cannot count and trust P's ordered notice."""
        with self._lock:
            entry = self._live(req_id)
            if entry is None:
                return failed("finish for a request this target does not expect")
            if entry.status is not PENDING:
                return entry.status
            if entry.conn_id is not None and entry.conn_id != conn_id:
                self._fail_locked(req_id, entry, "request finished from another connection")
                return entry.status
            entry.conn_id = conn_id
            if count_writes and entry.num_block_writes != num_block_writes:
                reason = f"P announced {num_block_writes} block writes, {entry.num_block_writes} landed"
                self._fail_locked(req_id, entry, reason)
                return entry.status
            entry.status = DONE
        self._counters.inc("transfers_done")
        return DONE

    def fail(self, req_id: str, reason: str) -> None:
        with self._lock:
            entry = self._requests.get(req_id)
            if entry is not None and entry.status is PENDING:
                self._fail_locked(req_id, entry, reason)

    def connection_lost(self, conn_id: int, reason: str) -> None:
        with self._lock:
            for req_id, entry in self._requests.items():
                if entry.conn_id == conn_id and entry.status is PENDING:
                    self._fail_locked(req_id, entry, f"connection lost mid-transfer: {reason}")

    def poll(self, req_id: str) -> TransferStatus:
        with self._lock:
            entry = self._live(req_id)
            return (
                entry.status if entry is not None else failed("unknown request (never expected or forgotten)")
            )

    def forget(self, req_id: str) -> None:
        with self._lock:
            self._requests.pop(req_id, None)

    def fail_all(self, reason: str) -> None:
        with self._lock:
            for req_id, entry in self._requests.items():
                if entry.status is PENDING:
                    self._fail_locked(req_id, entry, reason)

    def _live(self, req_id: str) -> _Expected | None:
        """The entry with its deadline applied (caller holds the lock)."""
        entry = self._requests.get(req_id)
        if entry is not None and entry.status is PENDING and entry.deadline is not None:
            if self._clock() >= entry.deadline:
                self._fail_locked(req_id, entry, "transfer timed out")
        return entry

    def _fail_locked(self, req_id: str, entry: _Expected, reason: str) -> None:
        entry.status = failed(reason)
        self._counters.inc("transfers_failed")
        log.warning("transfer failed", side="target", protocol=self._protocol, req_id=req_id, reason=reason)


@dataclass
class _Outgoing:
    peer_id: str
    status: TransferStatus = PENDING
    num_block_writes: int = 0
    done: threading.Event = field(default_factory=threading.Event)


class InitiatorRequests:
    """P's table of requests in flight. Thread-safe; only ``wait`` blocks."""

    def __init__(self, protocol: str, counters: Counters) -> None:
        self._protocol = protocol
        self._counters = counters
        self._lock = threading.Lock()
        self._requests: dict[str, _Outgoing] = {}

    def start(self, req_id: str, peer_id: str) -> None:
        with self._lock:
            entry = self._requests.setdefault(req_id, _Outgoing(peer_id))
        if entry.peer_id != peer_id:
            raise TransferError(f"request already sent to peer {entry.peer_id}", req_id=req_id, peer=peer_id)

    def is_pending(self, req_id: str) -> bool:
        with self._lock:
            entry = self._requests.get(req_id)
            return entry is not None and entry.status is PENDING

    def count(self, req_id: str, num_blocks: int) -> int:
        """Add ``num_blocks`` written; returns the running total (what the finish notice announces)."""
        with self._lock:
            entry = self._requests.get(req_id)
            if entry is None:
                return 0
            entry.num_block_writes += num_blocks
            return entry.num_block_writes

    def resolve(self, req_id: str, ok: bool, reason: str) -> None:
        with self._lock:
            entry = self._requests.get(req_id)
            if entry is None or entry.status is not PENDING:
                return
            entry.status = DONE if ok else failed(reason)
            entry.done.set()
        if ok:
            self._counters.inc("transfers_done")
        else:
            self._counters.inc("transfers_failed")
            log.warning(
                "transfer failed",
                side="initiator",
                protocol=self._protocol,
                req_id=req_id,
                peer=entry.peer_id,
                reason=reason,
            )

    def fail_peer(self, peer_id: str, reason: str) -> None:
        with self._lock:
            req_ids = [r for r, e in self._requests.items() if e.peer_id == peer_id and e.status is PENDING]
        for req_id in req_ids:
            self.resolve(req_id, False, reason)

    def fail_all(self, reason: str) -> None:
        with self._lock:
            req_ids = list(self._requests)
        for req_id in req_ids:
            self.resolve(req_id, False, reason)

    def poll(self, req_id: str) -> TransferStatus:
        with self._lock:
            entry = self._requests.get(req_id)
            return (
                entry.status if entry is not None else failed("unknown request (never written or forgotten)")
            )

    def wait(self, req_id: str, timeout_s: float) -> TransferStatus:
        with self._lock:
            entry = self._requests.get(req_id)
        if entry is None:
            return failed("unknown request (never written or forgotten)")
        entry.done.wait(timeout_s)
        return self.poll(req_id)

    def forget(self, req_id: str) -> None:
        """Drop the request; a ``wait`` on it returns now (FAILED: unknown) instead of at its timeout."""
        with self._lock:
            entry = self._requests.pop(req_id, None)
        if entry is not None:
            entry.done.set()
