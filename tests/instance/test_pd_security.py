"""An unauthenticated or incompatible peer on a running instance's pd-comm port is refused.

A real 1P1D cluster (redis-server + two `splitwise serve` processes) with no --cluster-token: the
instances share the random per-topic token kept in Redis. Against the prefill node's pd-comm port
(from its ready file) we try: a wrong token, no token at all, garbage bytes, and the right token
with an incompatible KV geometry / model id. Each is refused with its reason (on the wire, in P's
log and in P's /metrics). Whoever can read the Redis may join: the Redis token is accepted. And
the instance keeps serving disaggregated requests afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from pathlib import Path

import pytest
import redis

from scheduler.keys import KeySchema
from splitwise.cluster import Child, LocalCluster
from splitwise.engine.config import ModelConfig
from splitwise.kv_geometry import KVGeometry
from splitwise.transfer import wire
from splitwise.transfer.control import connect_control
from splitwise.transfer.errors import AuthenticationError, IncompatiblePeerError
from splitwise.transfer.messages import AuthChallenge, AuthHello, Compatibility, Refused
from tests.instance.helpers import complete
from tests.instance.pd_helpers import log_text, metric, wait_until

BLOCK_SIZE = 4  # tests/instance/helpers.ENGINE_ARGS


def _ignore(_conn: object, _msg: object) -> None:
    return None


def _connect(port: int, *, node_id: str, token: str, compat: Compatibility) -> str:
    """One control connection from this test (its own event loop): the peer id, then close."""

    async def connect() -> str:
        conn = await connect_control(
            "127.0.0.1", port, node_id=node_id, token=token, compat=compat, handler=_ignore
        )
        await conn.close("test done")
        return conn.peer_id

    return asyncio.run(connect())


def _prefill(cluster: LocalCluster) -> Child:
    return next(c for c in cluster.children if c.role == "prefill")


def _redis_token(cluster: LocalCluster) -> str:
    host, port = cluster.scheduler_address
    client = redis.Redis(host=host, port=port)
    try:
        value = client.get(KeySchema(cluster.spec.topic).cluster_token)
    finally:
        client.close()
    assert isinstance(value, bytes) and value, "the instances did not store a cluster token in Redis"
    return value.decode()


def _instance_compat(model: Path) -> Compatibility:
    mc = ModelConfig.from_dir(model)
    return Compatibility(
        model.name, KVGeometry("float32", BLOCK_SIZE, mc.num_layers, mc.num_kv_heads, mc.head_dim)
    )


def _raw_hello(port: int, mac: bytes, compat: Compatibility) -> Refused:
    """Speak the handshake by hand (connect_control refuses to send an empty token)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        challenge = wire.recv_message(sock)
        assert isinstance(challenge, AuthChallenge)
        wire.send_message(sock, AuthHello("intruder", os.urandom(32), mac, compat))
        reply = wire.recv_message(sock)
        assert isinstance(reply, Refused), reply
        assert _closed_by_peer(sock), "the server kept the refused connection open"
        return reply


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True  # closed with our unread garbage still in its buffer: a reset


def test_pd_comm_port_refuses_bad_peers_and_keeps_serving(cluster_factory, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(num_prefill=1, num_decode=1, transfer="tcp")
    p = _prefill(cluster)
    port = int(p.info["pd_comm_port"])  # type: ignore[call-overload]
    assert port > 0
    token = _redis_token(cluster)
    compat = _instance_compat(tiny_model)

    # 1. A wrong token: refused as an authentication failure.
    with pytest.raises(AuthenticationError, match="wrong or missing cluster token"):
        _connect(port, node_id="intruder", token="not-the-" + token, compat=compat)

    # 2. No token at all (an empty MAC).
    refused = _raw_hello(port, b"", compat)
    assert (refused.code, refused.reason) == ("auth", "authentication failed: wrong or missing cluster token")

    # 3. Garbage bytes instead of a handshake (an HTTP client on the wrong port).
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert isinstance(wire.recv_message(sock), AuthChallenge)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(64))
        reply = wire.recv_message(sock)
        assert isinstance(reply, Refused) and reply.code == "protocol", reply
        assert _closed_by_peer(sock)

    # 4. The right token but another KV geometry and model: refused, naming every field.
    other = Compatibility(
        "other-model",
        dataclasses.replace(compat.kv, block_size=BLOCK_SIZE * 2, head_dim=compat.kv.head_dim * 2),
    )
    with pytest.raises(IncompatiblePeerError) as excinfo:
        _connect(port, node_id="odd-peer", token=token, compat=other)
    for name in ("model_id", "block_size", "head_dim"):
        assert name in str(excinfo.value)
    assert "num_layers" not in str(excinfo.value)  # only what differs

    # 5. Whoever can read the Redis may join: the token from Redis and our geometry are accepted.
    assert _connect(port, node_id="friend", token=token, compat=compat) == p.info["node_id"]

    # Counted and logged on P, each with its reason.
    assert wait_until(lambda: metric(p, "splitwise_pd_control_events_total", event="refused_auth") == 2, 10)
    assert metric(p, "splitwise_pd_control_events_total", event="refused_protocol") == 1
    assert metric(p, "splitwise_pd_control_events_total", event="refused_incompatible") == 1
    log = log_text(p)
    assert log.count("control connection refused") == 4, cluster.log_tail(p)
    assert "incompatible peer" in log and "wrong or missing cluster token" in log

    # The instance keeps serving: disaggregated requests through either node still work.
    for child in cluster.children:
        resp = complete(child.base_url, [5, 6, 7, 8, 9, 10, 11], max_tokens=4)
        assert resp["usage"]["completion_tokens"] == 4
    d = next(c for c in cluster.children if c.role == "decode")
    assert log_text(d).count("remote prefill landed") == 2, cluster.log_tail(d)
    assert p.process.poll() is None and d.process.poll() is None
