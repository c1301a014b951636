"""The rdma side channel authenticates with the cluster token before it reveals any memory key
(#11): wrong tokens, garbage, oversize length prefixes, unauthenticated Hellos and slow clients
are refused and closed, the target keeps serving, and no refused peer ever sees a HelloReply."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest
import torch

from rdma import messages
from rdma.fake import FakeBackend, FakeFabric
from rdma.transport import RdmaInitiator, RdmaTarget
from rdma.verbs import LinkLayer
from splitwise.engine.kv_cache import KVCache, KVCacheGeometry
from splitwise.transfer.base import TransportOptions
from splitwise.transfer.errors import AuthenticationError

GEOMETRY = KVCacheGeometry(
    num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8, dtype="float16"
)
TOKEN = "the-cluster-token"
HANDSHAKE_S = 0.5


@pytest.fixture()
def target() -> Iterator[tuple[RdmaTarget, FakeBackend]]:
    backend = FakeBackend(FakeFabric().add_device("d0").add_device("p0"))
    options = TransportOptions(connect_timeout_s=HANDSHAKE_S, node_id="decode", cluster_token=TOKEN)
    d = RdmaTarget(options, backend=backend, nics=["d0"])
    d.register(KVCache(GEOMETRY))
    yield d, backend
    d.close()


def initiator(backend: FakeBackend, token: str) -> RdmaInitiator:
    p = RdmaInitiator(
        TransportOptions(connect_timeout_s=5, node_id="prefill", cluster_token=token),
        backend=backend,
        nics=["p0"],
    )
    kv = KVCache(GEOMETRY)
    kv.as_bytes().copy_(torch.arange(GEOMETRY.total_bytes, dtype=torch.int64).remainder(251).to(torch.uint8))
    p.register(kv)
    return p


def read_until_eof(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    sock.settimeout(timeout_s)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # closed with our bytes unread: a reset instead of a FIN
            return data
        if not chunk:
            return data
        data += chunk


def raw(target: RdmaTarget) -> socket.socket:
    endpoint = target.endpoint()
    return socket.create_connection((endpoint.host, endpoint.port), timeout=5)


def assert_still_serves(target: RdmaTarget, backend: FakeBackend) -> None:
    p = initiator(backend, TOKEN)
    try:
        p.connect("d", target.endpoint())
        target.expect("ok", [1, 2], timeout_s=10)
        for layer in range(GEOMETRY.num_layers):
            p.write_layer("d", "ok", layer, [3, 4], [1, 2])
        p.finish("d", "ok")
        assert p.wait("ok", 10).is_done and target.poll("ok").is_done
    finally:
        p.close()


def test_wrong_token_is_refused_and_the_target_keeps_serving(target: tuple[RdmaTarget, FakeBackend]) -> None:
    d, backend = target
    p = initiator(backend, "not-the-token")
    try:
        with pytest.raises(AuthenticationError):
            p.connect("d", d.endpoint())
    finally:
        p.close()
    # The client raises on reading Refused, which the target sends just before it counts the
    # refusal on its own thread: wait (bounded) for the count rather than race it.
    deadline = time.monotonic() + 10
    while d.counters.get("handshakes_refused") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert d.counters.get("handshakes_refused") == 1
    assert d.counters.get("initiators_connected") == 0
    assert_still_serves(d, backend)


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # garbage: a length of 0x47455420, far over the pre-auth bound
        struct.pack(">I", 0xFFFFFFFF),  # an oversize length prefix
        struct.pack(">I", 0),  # an empty frame
        struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1",  # a frame that is not msgpack
    ],
    ids=["garbage", "oversize", "empty", "not-msgpack"],
)
def test_garbage_before_auth_is_refused_without_any_key(
    target: tuple[RdmaTarget, FakeBackend], payload: bytes
) -> None:
    d, backend = target
    with raw(d) as sock:
        sock.sendall(payload)
        received = read_until_eof(sock)
    assert messages.HelloReply.TAG.encode() not in received  # no lane, no rkey
    assert d.counters.get("handshakes_refused") == 1
    assert_still_serves(d, backend)


def test_a_hello_without_the_challenge_reveals_nothing(target: tuple[RdmaTarget, FakeBackend]) -> None:
    d, backend = target
    fake_lane = messages.QpEndpoint(
        "p0", 1, LinkLayer.ETHERNET, 0, "0000:0000:0000:0000:0000:ffff:0a00:0002", 9, 1, 1024
    )
    hello = messages.Hello("intruder", GEOMETRY, [fake_lane])
    with raw(d) as sock:
        messages.send_message(sock, hello)  # skips the challenge: an old client or an attacker
        received = read_until_eof(sock)
    assert messages.HelloReply.TAG.encode() not in received
    assert d.counters.get("handshakes_refused") == 1
    assert_still_serves(d, backend)


def test_a_slow_client_is_cut_at_the_whole_handshake_deadline(target: tuple[RdmaTarget, FakeBackend]) -> None:
    """One byte at a time, each well inside a per-read timeout: only a deadline for the whole
    handshake ends it."""
    d, backend = target
    started = time.monotonic()
    with raw(d) as sock:
        sock.sendall(struct.pack(">I", 200))  # announces a plausible AuthHello...
        closed = False
        for _ in range(100):  # ...then trickles it, one byte per 0.05 s (5 s in all)
            try:
                sock.sendall(b"\x00")
                if sock.recv(65536, socket.MSG_DONTWAIT) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
            time.sleep(0.05)
    assert closed
    assert time.monotonic() - started < 4 * HANDSHAKE_S + 1
    assert d.counters.get("handshakes_refused") == 1
    assert_still_serves(d, backend)


def test_proofs_are_bound_to_the_rdma_domain() -> None:
    """A MAC made for the control channel does not verify on the rdma side channel."""
    from splitwise.transfer import auth

    args = (b"token", b"client", b"n" * 32, b"m" * 32, "prefill")
    assert auth.mac(*args) != auth.mac(*args, domain=b"splitwise-rdma-v1")


def test_no_cluster_token_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cluster token"):
        RdmaTarget(TransportOptions(), backend=FakeBackend(FakeFabric()))
