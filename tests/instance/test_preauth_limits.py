"""Pre-authentication resource limits on a running instance's pd-comm (control) and kv (tcp transfer)
ports (issue #13, item 7), against a real 1P1D cluster. Before a peer proved it knows the token or
holds an access key it may cost only a little: a declared frame larger than a hello is refused at
once (nothing allocated for it), idle unauthenticated connections cost well under 64 KiB each and
are capped per port (threads stay bounded), and a peer dripping a byte at a time is cut at the
handshake deadline. The instances keep serving."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
import redis

from scheduler.keys import KeySchema
from scheduler.messages import NodeInfo, decode
from splitwise.cluster import Child, LocalCluster
from splitwise.codes import Protocol
from splitwise.transfer import wire
from splitwise.transfer.control import MAX_HANDSHAKING as CONTROL_CAP
from splitwise.transfer.messages import AuthChallenge, Refused
from splitwise.transfer.stream_target import MAX_HANDSHAKING as KV_CAP
from tests.instance.helpers import complete
from tests.instance.pd_helpers import make_prompt

NUM_IDLE = 24  # below both caps: every one of them is held open by the server


def _status(child: Child, field: str) -> int:
    for line in open(f"/proc/{child.process.pid}/status").read().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def _rss_kib(child: Child) -> int:
    return _status(child, "VmRSS")


def _kv_port(cluster: LocalCluster, node_id: str) -> int:
    host, port = cluster.scheduler_address
    client = redis.Redis(host=host, port=port)
    try:
        payload = client.hget(KeySchema(cluster.spec.topic).nodes, node_id)
    finally:
        client.close()
    assert isinstance(payload, bytes)
    return int(decode(payload, NodeInfo).transfer_endpoints[Protocol.TCP].port)


def _closed_within(sock: socket.socket, timeout_s: float) -> bool:
    sock.settimeout(timeout_s)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


@pytest.fixture(scope="module")
def cluster(tiny_model):  # type: ignore[no-untyped-def]
    from tests.instance.helpers import start_cluster

    c = start_cluster(tiny_model, num_prefill=1, num_decode=1, transfer="tcp")
    yield c
    c.stop()


def _ports(cluster: LocalCluster) -> dict[str, tuple[Child, int, int]]:
    p = next(c for c in cluster.children if c.role == "prefill")
    d = next(c for c in cluster.children if c.role == "decode")
    return {
        "control": (p, int(p.info["pd_comm_port"]), CONTROL_CAP),  # type: ignore[call-overload]
        "kv": (d, _kv_port(cluster, str(d.info["node_id"])), KV_CAP),
    }


def test_oversized_pre_auth_frame_is_refused_at_once(cluster: LocalCluster) -> None:
    for name, (_child, port, _cap) in _ports(cluster).items():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            if name == "control":
                assert isinstance(wire.recv_message(sock), AuthChallenge)
            sock.sendall(struct.pack(">I", 16 * 1024 * 1024 - 1) + os.urandom(64))  # a 16 MiB "hello"
            start = time.monotonic()
            if name == "control":
                reply = wire.recv_message(sock)
                assert isinstance(reply, Refused) and reply.code == "protocol", reply
            assert _closed_within(sock, 5.0), name
            assert time.monotonic() - start < 5.0


def test_idle_unauthenticated_connections_are_cheap_and_capped(cluster: LocalCluster) -> None:
    for name, (child, port, cap) in _ports(cluster).items():
        rss_before, threads_before = _rss_kib(child), _status(child, "Threads")
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(NUM_IDLE)]
        try:
            time.sleep(0.5)  # the server accepted them and sits in their handshakes
            per_conn_kib = (_rss_kib(child) - rss_before) / NUM_IDLE
            threads = _status(child, "Threads")
            print(
                f"{name}: {per_conn_kib:.1f} KiB per idle connection, threads {threads_before} -> {threads}"
            )
            assert per_conn_kib <= 64, (name, per_conn_kib)
            # Past the cap, new connections are closed at once and no thread is started for them.
            extra = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(cap)]
            try:
                time.sleep(0.5)
                closed = sum(_closed_within(s, 0.2) for s in extra)
                assert closed >= cap - (cap - NUM_IDLE) - 1, (name, closed)
                assert _status(child, "Threads") <= threads_before + cap + 2, name
            finally:
                for s in extra:
                    s.close()
        finally:
            for s in idle:
                s.close()


def test_a_slow_drip_handshake_is_cut_at_the_deadline(cluster: LocalCluster) -> None:
    # The control handshake deadline is 5 s, the kv one the transport's connect timeout (10 s).
    for name, (_child, port, _cap) in _ports(cluster).items():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            if name == "control":
                assert isinstance(wire.recv_message(sock), AuthChallenge)
            sock.sendall(struct.pack(">I", 200))  # a plausible hello length, then a byte at a time
            start = time.monotonic()
            cut = False
            while time.monotonic() - start < 30:
                try:
                    sock.sendall(b"\x00")
                except (BrokenPipeError, ConnectionResetError):
                    cut = True
                    break
                if _closed_within(sock, 0.5):
                    cut = True
                    break
            elapsed = time.monotonic() - start
            assert cut, f"{name}: a byte-per-0.5 s drip kept the handshake open for 30 s"
            assert elapsed < 15, (name, elapsed)
    # ... and the pair still serves disaggregated requests.
    d = next(c for c in cluster.children if c.role == "decode")
    assert complete(d.base_url, make_prompt(9, seed=3), max_tokens=3)["usage"]["completion_tokens"] == 3
