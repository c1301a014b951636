"""The P<->D control channel over real loopback sockets: auth, compatibility, RPC, refusals."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from splitwise.transfer import wire
from splitwise.transfer.control import Compatibility, ControlConnection, ControlServer, connect_control
from splitwise.transfer.errors import (
    AuthenticationError,
    ConnectionLostError,
    IncompatiblePeerError,
    RemoteError,
    UnexpectedBlocksError,
)
from splitwise.transfer.messages import (
    AuthChallenge,
    AuthHello,
    AuthWelcome,
    CallMessage,
    CancelRequest,
    PrefillResult,
    PrefillTask,
    Refused,
)

TOKEN = "s3cret-cluster-token"
COMPAT = Compatibility("qwen3-0.6b", "bfloat16", block_size=16, num_layers=28, num_kv_heads=8, head_dim=128)
TASK = PrefillTask(
    0,
    "r-1",
    [1, 2, 3],
    {"temperature": 0.0, "max_tokens": 8},
    [4, 5],
    "tcp",
    {"protocol": "tcp", "host": "127.0.0.1", "port": 9},
)


class Inbox:
    """A handler that records calls; ``fail`` makes it refuse them."""

    def __init__(self) -> None:
        self.calls: list[CallMessage] = []
        self.connections: list[ControlConnection] = []
        self.disconnects: list[str] = []
        self.fail: Exception | None = None
        self.arrived = threading.Event()

    def __call__(self, connection: ControlConnection, message: CallMessage) -> None:
        self.connections.append(connection)
        self.calls.append(message)
        self.arrived.set()
        if self.fail is not None:
            raise self.fail

    def on_disconnect(self, connection: ControlConnection, reason: str) -> None:
        self.disconnects.append(reason)


@pytest.fixture()
def p_inbox() -> Inbox:
    return Inbox()


@pytest.fixture()
def server(p_inbox: Inbox) -> Iterator[ControlServer]:
    srv = ControlServer(
        node_id="P0",
        token=TOKEN,
        compat=COMPAT,
        handler=p_inbox,
        on_disconnect=p_inbox.on_disconnect,
        host="127.0.0.1",
        handshake_timeout_s=1.0,
    )
    yield srv
    srv.close()


def connect(
    server: ControlServer, *, token: str = TOKEN, compat: Compatibility = COMPAT, inbox: Inbox | None = None
) -> ControlConnection:
    inbox = inbox or Inbox()
    return connect_control(
        "127.0.0.1",
        server.port,
        node_id="D0",
        token=token,
        compat=compat,
        handler=inbox,
        on_disconnect=inbox.on_disconnect,
    )


def wait_count(server: ControlServer, name: str, value: int) -> int:
    deadline = time.monotonic() + 5.0
    while server.counters.get(name) < value and time.monotonic() < deadline:
        time.sleep(0.01)
    return server.counters.get(name)


def assert_server_still_serves(server: ControlServer, inbox: Inbox) -> None:
    connection = connect(server)
    connection.call(TASK)
    assert inbox.calls[-1] == dataclasses.replace(TASK, call_id=inbox.calls[-1].call_id)
    connection.close()


def test_authenticated_rpc_both_ways(server: ControlServer, p_inbox: Inbox) -> None:
    d_inbox = Inbox()
    d_side = connect(server, inbox=d_inbox)
    assert d_side.peer_id == "P0" and d_side.peer_compat == COMPAT

    d_side.call(TASK)  # D -> P: the prefill task arrives intact, Ack returns
    assert len(p_inbox.calls) == 1
    received = p_inbox.calls[0]
    assert isinstance(received, PrefillTask) and received.call_id > 0
    assert dataclasses.replace(received, call_id=0) == TASK

    # P -> D on the same connection: the first token, later.
    p_side = p_inbox.connections[0]
    assert p_side.peer_id == "D0"
    p_side.call(PrefillResult(0, "r-1", first_token_id=42, logprob=-0.5))
    assert d_inbox.calls == [PrefillResult(d_inbox.calls[0].call_id, "r-1", 42, -0.5)]

    p_inbox.fail = UnexpectedBlocksError("no such blocks", req_id="r-1")
    with pytest.raises(RemoteError, match="no such blocks") as info:
        d_side.call(CancelRequest(0, "r-1", "client went away"))
    assert info.value.retryable is False and info.value.req_id == "r-1"
    d_side.close()


def test_handler_bug_is_reported_to_the_caller_and_the_connection_survives(
    server: ControlServer, p_inbox: Inbox
) -> None:
    connection = connect(server)
    p_inbox.fail = KeyError("boom")
    with pytest.raises(RemoteError, match="internal error: KeyError"):
        connection.call(TASK)
    p_inbox.fail = None
    connection.call(TASK)
    assert len(p_inbox.calls) == 2 and server.counters.get("control_handler_errors") == 1
    connection.close()


def test_wrong_token_is_refused(server: ControlServer, p_inbox: Inbox) -> None:
    with pytest.raises(AuthenticationError, match="wrong or missing cluster token"):
        connect(server, token="guess")
    assert wait_count(server, "refused_auth", 1) == 1
    assert p_inbox.calls == []
    assert_server_still_serves(server, p_inbox)


def test_missing_token_is_refused(server: ControlServer, p_inbox: Inbox) -> None:
    sock = wire.connect("127.0.0.1", server.port, 5.0)
    sock.settimeout(5.0)
    challenge = wire.recv_message(sock)
    assert isinstance(challenge, AuthChallenge) and len(challenge.nonce) == 32
    wire.send_message(sock, AuthHello("intruder", b"\x00" * 32, b"", COMPAT.to_dict()))
    assert wire.recv_message(sock) == Refused("auth", "authentication failed: wrong or missing cluster token")
    with pytest.raises(ConnectionLostError):
        wire.recv_message(sock)  # and closed
    sock.close()
    assert wait_count(server, "refused_auth", 1) == 1
    assert_server_still_serves(server, p_inbox)


def test_garbage_and_silence_are_refused(server: ControlServer, p_inbox: Inbox) -> None:
    garbage = socket.create_connection(("127.0.0.1", server.port))
    garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    silent = socket.create_connection(("127.0.0.1", server.port))
    assert wait_count(server, "refused_protocol", 1) == 1
    assert wait_count(server, "refused_timeout", 1) == 1  # handshake_timeout_s=1.0
    garbage.close()
    silent.close()
    assert_server_still_serves(server, p_inbox)


def test_incompatible_peer_is_refused_with_every_difference(server: ControlServer, p_inbox: Inbox) -> None:
    other = dataclasses.replace(COMPAT, block_size=32, dtype="float16")
    with pytest.raises(IncompatiblePeerError) as info:
        connect(server, compat=other)
    assert "block_size: ours 16, peer 32" in str(
        info.value
    ) and "dtype: ours 'bfloat16', peer 'float16'" in str(info.value)
    assert wait_count(server, "refused_incompatible", 1) == 1
    assert_server_still_serves(server, p_inbox)


def test_client_refuses_a_server_that_does_not_know_the_token() -> None:
    listener = wire.listen("127.0.0.1", 0)

    def impostor() -> None:
        sock, _ = listener.accept()
        wire.send_message(sock, AuthChallenge("P?", b"\x07" * 32))
        wire.recv_message(sock)
        wire.send_message(sock, AuthWelcome("P?", b"\x00" * 32, COMPAT.to_dict()))
        sock.recv(1)
        sock.close()

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    with pytest.raises(AuthenticationError, match="server failed to prove"):
        connect_control(
            "127.0.0.1", listener.getsockname()[1], node_id="D0", token=TOKEN, compat=COMPAT, handler=Inbox()
        )
    thread.join(5.0)
    listener.close()


def test_peer_closing_fails_pending_calls_and_reports_the_disconnect(
    server: ControlServer, p_inbox: Inbox
) -> None:
    d_inbox = Inbox()
    d_side = connect(server, inbox=d_inbox)
    d_side.call(TASK)
    server.close()  # P goes away
    deadline = time.monotonic() + 5.0
    while not d_inbox.disconnects and time.monotonic() < deadline:
        time.sleep(0.01)
    assert d_inbox.disconnects and d_side.is_closed
    with pytest.raises(ConnectionLostError):
        d_side.call(TASK)


def test_call_from_a_handler_on_its_own_connection_is_refused(server: ControlServer, p_inbox: Inbox) -> None:
    def reentrant(connection: ControlConnection, message: CallMessage) -> None:
        connection.call(CancelRequest(0, message.req_id, "nested"))  # would wait for a reply it must read

    d_side = connect_control(
        "127.0.0.1", server.port, node_id="D0", token=TOKEN, compat=COMPAT, handler=reentrant
    )
    d_side.call(TASK)
    p_side = p_inbox.connections[0]
    with pytest.raises(RemoteError, match="would deadlock"):
        p_side.call(PrefillResult(0, "r-1", 1, 0.0), timeout_s=5.0)
    d_side.close()


def test_empty_token_is_a_configuration_error(p_inbox: Inbox) -> None:
    with pytest.raises(ValueError, match="--cluster-token"):
        ControlServer(node_id="P0", token="", compat=COMPAT, handler=p_inbox)
