"""The tcp target against hand-built frames on a raw socket: refusals keep the stream in sync."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterator

import pytest
import torch
from transfer_peer import GEOMETRY, initial_kv, make_cache

from splitwise.engine.kv_cache import KVCache
from splitwise.transfer import TransferState, create_target, wire
from splitwise.transfer.base import TransportTarget
from splitwise.transfer.messages import LayerWrite, RequestFinish, RequestResult, XferHello, XferHelloReply

BLOCK_BYTES = GEOMETRY.bytes_per_block


@pytest.fixture()
def target() -> Iterator[tuple[TransportTarget, KVCache]]:
    kv = make_cache(GEOMETRY, 1, shared=False)
    tcp = create_target("tcp")
    tcp.register(kv)
    yield tcp, kv
    tcp.close()


def raw_connection(
    target: TransportTarget, geometry: dict[str, object] | None = None, access_key: str | None = None
) -> socket.socket:
    endpoint = target.endpoint()
    sock = wire.connect(endpoint.host, endpoint.port, 5.0)
    sock.settimeout(5.0)
    key = endpoint.access_key if access_key is None else access_key
    wire.send_message(sock, XferHello("raw-test", geometry or GEOMETRY, key))
    return sock


def send_layer(sock: socket.socket, req_id: str, layer: int, runs: list[list[int]], fill: int) -> None:
    payload = bytes([fill]) * (2 * sum(n for _, n in runs) * BLOCK_BYTES)
    wire.send_buffers(sock, [wire.frame_bytes(LayerWrite(req_id, layer, runs, len(payload))), payload])


def assert_closed_by_peer(sock: socket.socket) -> None:
    try:
        data = sock.recv(1)
    except ConnectionResetError:  # closed with our garbage unread: RST instead of FIN
        return
    assert data == b""


def test_frames_for_unexpected_blocks_are_refused_and_the_stream_stays_usable(target) -> None:  # type: ignore[no-untyped-def]
    tcp, kv = target
    sock = raw_connection(tcp)
    assert wire.recv_message(sock) == XferHelloReply(True, "", GEOMETRY)
    tcp.expect("r", [1, 2])

    send_layer(sock, "r", 0, [[5, 1]], fill=0xAB)  # block 5 is not r's
    refused = wire.recv_message(sock)
    assert isinstance(refused, RequestResult) and not refused.ok and "[5]" in refused.reason
    send_layer(sock, "ghost", 0, [[1, 1]], fill=0xAB)  # a request D never expected
    refused = wire.recv_message(sock)
    assert isinstance(refused, RequestResult) and refused.req_id == "ghost" and not refused.ok
    assert tcp.poll("r").state is TransferState.FAILED
    assert torch.equal(kv.tensor, initial_kv(GEOMETRY, 1))  # not one byte written anywhere
    assert tcp.counters.get("frames_rejected") == 2

    # Same connection, a valid request: the refused payloads were drained, framing is intact.
    tcp.expect("ok", [7])
    for layer in range(GEOMETRY.num_layers):
        send_layer(sock, "ok", layer, [[7, 1]], fill=0x3C)
    wire.send_message(sock, RequestFinish("ok", GEOMETRY.num_layers))
    assert wire.recv_message(sock) == RequestResult("ok", True, "")
    assert tcp.poll("ok").is_done
    assert bool(
        (kv.as_bytes().view(-1).numpy()[GEOMETRY.block_offset(0, 0, 7) :][:BLOCK_BYTES] == 0x3C).all()
    )
    sock.close()


def test_finish_announcing_more_writes_than_landed_fails(target) -> None:  # type: ignore[no-untyped-def]
    tcp, _ = target
    sock = raw_connection(tcp)
    wire.recv_message(sock)
    tcp.expect("r", [3])
    send_layer(sock, "r", 0, [[3, 1]], fill=1)
    wire.send_message(sock, RequestFinish("r", GEOMETRY.num_layers))  # claims 4 layers, sent 1
    verdict = wire.recv_message(sock)
    assert isinstance(verdict, RequestResult) and not verdict.ok and "announced 4" in verdict.reason
    assert tcp.poll("r").state is TransferState.FAILED
    sock.close()


def test_garbage_and_mismatched_hello_are_refused_and_the_target_keeps_serving(target) -> None:  # type: ignore[no-untyped-def]
    tcp, kv = target
    endpoint = tcp.endpoint()
    garbage = socket.create_connection((endpoint.host, endpoint.port))
    garbage.sendall(b"\xff" * 64)
    garbage.settimeout(5.0)
    assert_closed_by_peer(garbage)
    garbage.close()

    bad = raw_connection(tcp, dataclasses.replace(GEOMETRY, head_dim=16))
    reply = wire.recv_message(bad)
    assert isinstance(reply, XferHelloReply) and not reply.ok and "head_dim" in reply.reason
    bad.close()

    keyless = raw_connection(tcp, access_key="0" * 32)  # knows the port, was never handed the endpoint
    reply = wire.recv_message(keyless)
    assert isinstance(reply, XferHelloReply) and not reply.ok and "access key" in reply.reason
    keyless.close()

    deadline = time.monotonic() + 5.0
    while tcp.counters.get("connections_refused") < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tcp.counters.get("connections_refused") == 3

    good = raw_connection(tcp)
    assert isinstance(wire.recv_message(good), XferHelloReply)
    tcp.expect("r", [0])
    for layer in range(GEOMETRY.num_layers):
        send_layer(good, "r", layer, [[0, 1]], fill=9)
    wire.send_message(good, RequestFinish("r", GEOMETRY.num_layers))
    assert wire.recv_message(good) == RequestResult("r", True, "")
    assert kv.tensor[:, :, 0].view(torch.uint8).eq(9).all()
    good.close()
