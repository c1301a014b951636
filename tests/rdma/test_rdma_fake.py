"""Rules of the test double beyond the shared contract: the NIC-side checks real hardware makes
silently (dropped packets become RETRY_EXC_ERR) and the error-state bookkeeping."""

from __future__ import annotations

import dataclasses

import pytest
from rdma_test_support import Buffer, connected_pair

from rdma.connection import RcConnection, rtr_attrs
from rdma.errors import VerbsCallError
from rdma.fake import FakeBackend, FakeFabric, FakePort
from rdma.verbs import Access, LinkLayer, QPState, WcStatus, WorkRequest

RW = Access.LOCAL_WRITE | Access.REMOTE_WRITE


def device(port: FakePort | None = None):  # noqa: ANN201
    backend = FakeBackend(FakeFabric().add_device("fake0", port))
    dev = backend.open_device("fake0")
    return dev, dev.query_port(1)


def buffers(dev):  # noqa: ANN001, ANN201
    src, dst = Buffer(256, b"\x11"), Buffer(256)
    return (
        src,
        dst,
        dev.register_memory(src.addr, 256, Access.LOCAL_WRITE),
        dev.register_memory(dst.addr, 256, RW),
    )


def test_psn_mismatch_is_a_retry_error() -> None:
    dev, port = device()
    a, b = RcConnection(dev, port), RcConnection(dev, port)
    a_end, b_end = a.local_endpoint(), b.local_endpoint()
    a.connect(b_end)
    b.connect(dataclasses.replace(a_end, psn=(a_end.psn + 1) % (1 << 24)))  # b expects the wrong psn
    src, dst, smr, dmr = buffers(dev)
    a.qp.post_send([WorkRequest(1, smr.addr, 8, smr.lkey, dmr.addr, dmr.rkey, True)])
    [c] = a.qp.poll_send(1)
    assert c.status is WcStatus.RETRY_EXC_ERR and dst.read() == bytes(256)


def test_peer_not_ready_is_a_retry_error() -> None:
    dev, port = device()
    a, b = RcConnection(dev, port), RcConnection(dev, port)
    a.connect(b.local_endpoint())  # b never leaves INIT
    src, dst, smr, dmr = buffers(dev)
    a.qp.post_send([WorkRequest(1, smr.addr, 8, smr.lkey, dmr.addr, dmr.rkey, True)])
    assert a.qp.poll_send(1)[0].status is WcStatus.RETRY_EXC_ERR


def test_remote_access_error_also_errors_the_responder_and_flushes_its_receives() -> None:
    dev, port = device()
    a, b = connected_pair(dev, port)
    b.qp.post_recv([1, 2])
    src, dst, smr, dmr = buffers(dev)
    a.qp.post_send([WorkRequest(1, smr.addr, 8, smr.lkey, dmr.addr, dmr.rkey + 99, True)])
    assert b.state is QPState.ERROR
    assert [(c.wr_id, c.status) for c in b.qp.poll_recv(8)] == [
        (1, WcStatus.WR_FLUSH_ERR),
        (2, WcStatus.WR_FLUSH_ERR),
    ]


def test_posting_on_an_errored_qp_flushes() -> None:
    dev, port = device()
    a, _ = connected_pair(dev, port)
    src, dst, smr, dmr = buffers(dev)
    a.qp.post_send([WorkRequest(1, smr.addr, 8, smr.lkey + 99, dmr.addr, dmr.rkey, False)])
    a.qp.post_send([WorkRequest(2, smr.addr, 8, smr.lkey, dmr.addr, dmr.rkey, False)])
    assert [c.status for c in a.qp.poll_send(8)] == [WcStatus.LOC_PROT_ERR, WcStatus.WR_FLUSH_ERR]
    assert a.qp.num_free_send_slots == a.caps.max_send_wr


def test_rtr_checks_mtu_and_grh() -> None:
    dev, port = device(FakePort(active_mtu_bytes=1024))
    a, b = RcConnection(dev, port), RcConnection(dev, port)
    attrs = rtr_attrs(port, b.local_endpoint(), a.policy)
    with pytest.raises(VerbsCallError, match="path MTU"):
        a.qp.to_rtr(dataclasses.replace(attrs, path_mtu_bytes=4096))
    with pytest.raises(VerbsCallError, match="GRH"):
        a.qp.to_rtr(dataclasses.replace(attrs, is_global=False, dgid=None))


def test_infiniband_pairs_connect_by_lid() -> None:
    dev, port = device(FakePort(link_layer=LinkLayer.INFINIBAND, lid=7, active_mtu_bytes=4096))
    a, b = connected_pair(dev, port)
    assert a.qp.rtr is not None and (a.qp.rtr.dlid, a.qp.rtr.is_global) == (7, False)  # type: ignore[attr-defined]
    src, dst, smr, dmr = buffers(dev)
    a.qp.post_send([WorkRequest(1, smr.addr, 256, smr.lkey, dmr.addr, dmr.rkey, True)])
    assert a.qp.poll_send(1)[0].ok and dst.read() == b"\x11" * 256


def test_registration_rules() -> None:
    dev, _ = device()
    buf = Buffer(64)
    with pytest.raises(VerbsCallError, match="LOCAL_WRITE"):
        dev.register_memory(buf.addr, 64, Access.REMOTE_WRITE)
    with pytest.raises(VerbsCallError):
        dev.register_memory(buf.addr, 0, Access.LOCAL_WRITE)
