"""TargetRequests / InitiatorRequests as plain state machines: exact transitions, injected clock."""

from __future__ import annotations

import pytest

from scheduler.clock import Clock
from splitwise.counters import Counters
from splitwise.transfer.base import DONE, PENDING, TransferState, failed
from splitwise.transfer.errors import TransferError, UnexpectedBlocksError
from splitwise.transfer.tracking import InitiatorRequests, TargetRequests


class FakeClock(Clock):
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


def make() -> tuple[TargetRequests, Counters, FakeClock]:
    counters, clock = Counters(), FakeClock()
    return TargetRequests("test", counters, clock), counters, clock


def test_counted_writes_then_matching_finish_is_done() -> None:
    table, counters, _ = make()
    table.expect("r", [4, 5, 6], timeout_s=None)
    assert table.admit("r", conn_id=1, dst_block_ids=[4, 5]) == frozenset({4, 5, 6})
    table.landed("r", 2)
    table.admit("r", conn_id=1, dst_block_ids=[6])
    table.landed("r", 1)
    assert table.poll("r") is PENDING
    assert table.finish("r", conn_id=1, num_block_writes=3, count_writes=True) is DONE
    assert table.poll("r") is DONE and counters.snapshot() == {"transfers_done": 1}


def test_finish_count_mismatch_fails() -> None:
    table, counters, _ = make()
    table.expect("r", [1], timeout_s=None)
    table.admit("r", 1, [1])
    table.landed("r", 1)
    status = table.finish("r", 1, num_block_writes=2, count_writes=True)
    assert status == failed("P announced 2 block writes, 1 landed")
    assert counters.get("transfers_failed") == 1


def test_uncounted_finish_trusts_the_ordered_notice() -> None:
    table, _, _ = make()
    table.expect("r", [1], timeout_s=None)
    assert table.finish("r", 1, num_block_writes=8, count_writes=False) is DONE


def test_stray_block_and_second_connection_fail_the_request() -> None:
    table, _, _ = make()
    table.expect("a", [1, 2], timeout_s=None)
    with pytest.raises(UnexpectedBlocksError, match=r"not reserved for the request: \[3\]"):
        table.admit("a", 1, [2, 3])
    assert table.poll("a").state is TransferState.FAILED
    with pytest.raises(UnexpectedBlocksError, match="already failed"):
        table.admit("a", 1, [1])  # a failed request takes no more writes

    table.expect("b", [7], timeout_s=None)
    table.admit("b", 1, [7])
    with pytest.raises(UnexpectedBlocksError, match="two connections"):
        table.admit("b", 2, [7])
    assert table.poll("b").state is TransferState.FAILED


def test_connection_lost_fails_only_its_pending_requests() -> None:
    table, _, _ = make()
    for req_id, conn in (("on1", 1), ("on2", 2), ("done1", 1)):
        table.expect(req_id, [0], timeout_s=None)
        table.admit(req_id, conn, [0])
    table.finish("done1", 1, 0, count_writes=False)
    table.expect("unbound", [0], timeout_s=None)
    table.connection_lost(1, "EOF")
    assert table.poll("on1") == failed("connection lost mid-transfer: EOF")
    assert table.poll("on2") is PENDING and table.poll("unbound") is PENDING
    assert table.poll("done1") is DONE  # DONE is final


def test_deadline_uses_the_injected_clock() -> None:
    table, counters, clock = make()
    table.expect("r", [0], timeout_s=2.0)
    clock.now += 1.999
    assert table.poll("r") is PENDING
    clock.now += 0.001
    assert table.poll("r") == failed("transfer timed out")
    assert table.finish("r", 1, 0, count_writes=False).state is TransferState.FAILED
    assert counters.get("transfers_failed") == 1


def test_forget_and_unknown_requests() -> None:
    table, _, _ = make()
    table.expect("r", [0], timeout_s=None)
    with pytest.raises(TransferError, match="already expected"):
        table.expect("r", [1], timeout_s=None)
    table.forget("r")
    assert table.poll("r").state is TransferState.FAILED
    with pytest.raises(UnexpectedBlocksError, match="does not expect"):
        table.admit("r", 1, [0])


def test_initiator_table_resolves_once_and_fails_by_peer() -> None:
    counters = Counters()
    table = InitiatorRequests("test", counters)
    table.start("a", "d0")
    table.start("b", "d1")
    with pytest.raises(TransferError, match="already sent to peer d0"):
        table.start("a", "d1")
    assert table.count("a", 3) == 3 and table.count("a", 2) == 5
    table.resolve("a", True, "")
    table.resolve("a", False, "late failure")  # ignored: DONE is final
    table.fail_peer("d1", "gone")
    assert table.poll("a") is DONE and table.poll("b") == failed("gone")
    assert table.wait("b", 0.0) == failed("gone")
    assert counters.snapshot() == {"transfers_done": 1, "transfers_failed": 1}
