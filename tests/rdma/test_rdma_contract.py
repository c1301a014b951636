"""The verbs contract: ONE suite, run against the fake backend everywhere and against pyverbs where
an active RDMA port exists (marker ``rdma``; skipped with the reason otherwise).

What a pass on pyverbs proves: the test double's rules (below) are what real verbs do, so every
transport test that runs on the double exercises real semantics.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable

import pytest
from rdma_test_support import Buffer, connected_pair

from rdma.connection import QPPolicy, RcConnection
from rdma.errors import QueuePairStateError, SendQueueFullError
from rdma.verbs import (
    Access,
    Completion,
    MemoryRegion,
    PortInfo,
    QPCaps,
    QPState,
    VerbsDevice,
    WcOpcode,
    WcStatus,
    WorkRequest,
)

RW = Access.LOCAL_WRITE | Access.REMOTE_WRITE


def poll(fn: Callable[[int], list[Completion]], count: int, timeout_s: float = 5.0) -> list[Completion]:
    got: list[Completion] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        got += fn(count - len(got))
    return got


def settle(fn: Callable[[int], list[Completion]], wait_s: float = 0.05) -> list[Completion]:
    """Whatever arrives within ``wait_s`` (to show that nothing more arrives)."""
    time.sleep(wait_s)
    return fn(64)


def write(
    src: Buffer,
    dst: Buffer,
    src_mr: MemoryRegion,
    dst_mr: MemoryRegion,
    *,
    wr_id: int = 1,
    off: int = 0,
    length: int = 64,
    signaled: bool = True,
    imm: int | None = None,
    rkey: int | None = None,
    lkey: int | None = None,
) -> WorkRequest:
    return WorkRequest(
        wr_id,
        src_mr.addr + off,
        length,
        src_mr.lkey if lkey is None else lkey,
        dst_mr.addr + off,
        dst_mr.rkey if rkey is None else rkey,
        signaled,
        imm,
    )


Verbs = tuple[VerbsDevice, PortInfo]


def setup(
    verbs: Verbs, size: int = 4096, **kw: object
) -> tuple[RcConnection, RcConnection, Buffer, Buffer, MemoryRegion, MemoryRegion]:
    device, port = verbs
    a, b = connected_pair(device, port, **kw)  # type: ignore[arg-type]
    src, dst = Buffer(size, b"\xab"), Buffer(size)
    src_mr = device.register_memory(src.addr, size, Access.LOCAL_WRITE)
    dst_mr = device.register_memory(dst.addr, size, RW)
    return a, b, src, dst, src_mr, dst_mr


def test_connect_reaches_rts_with_sane_attributes(verbs: Verbs) -> None:
    a, b, *_ = setup(verbs)
    assert a.state is QPState.RTS and b.state is QPState.RTS
    assert a.peer is not None and a.peer.qpn == b.qp.qpn and a.peer.psn == b.psn


def test_write_copies_exact_bytes_and_signals_once(verbs: Verbs) -> None:
    a, _, src, dst, src_mr, dst_mr = setup(verbs)
    ctypes.memmove(src.addr + 100, bytes(range(100)), 100)
    a.qp.post_send([write(src, dst, src_mr, dst_mr, wr_id=7, off=100, length=100)])
    [done] = poll(a.qp.poll_send, 1)
    assert (done.wr_id, done.status, done.opcode) == (7, WcStatus.SUCCESS, WcOpcode.RDMA_WRITE)
    assert dst.read(100, 100) == bytes(range(100))
    assert dst.read(0, 100) == bytes(100) and dst.read(200) == bytes(4096 - 200)  # nothing else touched


def test_unsignaled_writes_complete_silently_and_one_signal_frees_the_batch(verbs: Verbs) -> None:
    a, _, src, dst, src_mr, dst_mr = setup(verbs, caps=QPCaps(max_send_wr=4, max_recv_wr=4))
    chain = [write(src, dst, src_mr, dst_mr, wr_id=i, off=i * 64, signaled=(i == 3)) for i in range(4)]
    a.qp.post_send(chain)
    assert [c.wr_id for c in poll(a.qp.poll_send, 1)] == [3]
    assert settle(a.qp.poll_send) == []
    assert dst.read(0, 256) == b"\xab" * 256
    a.qp.post_send(chain)  # all four slots were freed by the one signaled completion
    assert [c.wr_id for c in poll(a.qp.poll_send, 1)] == [3]


def test_send_queue_depth_is_enforced(verbs: Verbs) -> None:
    a, _, src, dst, src_mr, dst_mr = setup(verbs, caps=QPCaps(max_send_wr=4, max_recv_wr=4))
    unsignaled = [write(src, dst, src_mr, dst_mr, wr_id=i, signaled=False) for i in range(4)]
    a.qp.post_send(unsignaled)
    with pytest.raises(SendQueueFullError):  # never signaled: the slots stay taken
        a.qp.post_send([write(src, dst, src_mr, dst_mr, wr_id=9)])


def test_write_with_imm_consumes_a_posted_receive(verbs: Verbs) -> None:
    a, b, src, dst, src_mr, dst_mr = setup(verbs)
    b.qp.post_recv([42])
    a.qp.post_send([write(src, dst, src_mr, dst_mr, wr_id=5, length=8, imm=0xDEADBEEF)])
    [sent] = poll(a.qp.poll_send, 1)
    [got] = poll(b.qp.poll_recv, 1)
    assert sent.ok
    assert (got.wr_id, got.status, got.opcode, got.imm_data) == (
        42,
        WcStatus.SUCCESS,
        WcOpcode.RECV_RDMA_WITH_IMM,
        0xDEADBEEF,
    )
    assert dst.read(0, 8) == b"\xab" * 8


def test_write_with_imm_without_receive_is_an_rnr_error(verbs: Verbs) -> None:
    a, _, src, dst, src_mr, dst_mr = setup(verbs, policy=QPPolicy(rnr_retry=1, min_rnr_timer=1))
    a.qp.post_send([write(src, dst, src_mr, dst_mr, imm=1)])
    [failed] = poll(a.qp.poll_send, 1, timeout_s=30)
    assert failed.status is WcStatus.RNR_RETRY_EXC_ERR


@pytest.mark.parametrize("fault", ["bad_rkey", "out_of_bounds", "no_remote_write"])
def test_remote_access_errors_put_the_qp_in_error_and_flush_what_follows(verbs: Verbs, fault: str) -> None:
    device, _ = verbs
    a, _, src, dst, src_mr, dst_mr = setup(verbs)
    if fault == "no_remote_write":
        dst_mr = device.register_memory(dst.addr, dst.length, Access.LOCAL_WRITE)
    bad = write(
        src,
        dst,
        src_mr,
        dst_mr,
        wr_id=1,
        signaled=False,
        rkey=(dst_mr.rkey ^ 0x5A5A00) if fault == "bad_rkey" else None,
        length=8192 if fault == "out_of_bounds" else 64,
    )
    if fault == "out_of_bounds":  # the local side is fine: only the remote range is too long
        src_big = Buffer(8192)
        big_mr = device.register_memory(src_big.addr, 8192, Access.LOCAL_WRITE)
        bad = WorkRequest(1, big_mr.addr, 8192, big_mr.lkey, dst_mr.addr, dst_mr.rkey, False)
    a.qp.post_send([bad, write(src, dst, src_mr, dst_mr, wr_id=2)])
    first, second = poll(a.qp.poll_send, 2)
    assert (first.wr_id, first.status) == (1, WcStatus.REM_ACCESS_ERR)  # reported although unsignaled
    assert (second.wr_id, second.status) == (2, WcStatus.WR_FLUSH_ERR)
    assert a.state is QPState.ERROR
    assert dst.read() == bytes(4096)  # never success, nothing landed


def test_local_protection_error(verbs: Verbs) -> None:
    a, _, src, dst, src_mr, dst_mr = setup(verbs)
    a.qp.post_send([write(src, dst, src_mr, dst_mr, lkey=src_mr.lkey ^ 0x5A5A00)])
    [failed] = poll(a.qp.poll_send, 1)
    assert failed.status is WcStatus.LOC_PROT_ERR
    assert dst.read() == bytes(4096)


def test_post_send_needs_rts(verbs: Verbs) -> None:
    device, port = verbs
    conn = RcConnection(device, port)
    assert conn.state is QPState.INIT
    src = Buffer(64)
    mr = device.register_memory(src.addr, 64, RW)
    with pytest.raises(QueuePairStateError):
        conn.qp.post_send([WorkRequest(1, mr.addr, 8, mr.lkey, mr.addr, mr.rkey, True)])


def test_transitions_out_of_order_are_refused(verbs: Verbs) -> None:
    device, port = verbs
    a, b = connected_pair(device, port)
    with pytest.raises(QueuePairStateError):
        a.connect(b.local_endpoint())  # already RTS: must recreate first


def test_recreate_after_error_then_writes_work_again(verbs: Verbs) -> None:
    a, b, src, dst, src_mr, dst_mr = setup(verbs)
    a.qp.post_send([write(src, dst, src_mr, dst_mr, rkey=dst_mr.rkey ^ 0x5A5A00)])
    [failed] = poll(a.qp.poll_send, 1)
    assert not failed.ok
    old_qpn = a.qp.qpn
    a.recreate()
    b.recreate()
    assert a.qp.qpn != old_qpn and a.state is QPState.INIT
    a_end, b_end = a.local_endpoint(), b.local_endpoint()
    a.connect(b_end)
    b.connect(a_end)
    a.qp.post_send([write(src, dst, src_mr, dst_mr, wr_id=11)])
    [ok] = poll(a.qp.poll_send, 1)
    assert ok.ok and dst.read(0, 64) == b"\xab" * 64
