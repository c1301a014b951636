"""The P<->D control channel over real loopback sockets: auth, compatibility, RPC, refusals.

Each test runs both ends on one asyncio event loop (the channel is asyncio, like the instance).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

import pytest

from splitwise.engine.sampling_params import SamplingParams
from splitwise.kv_geometry import KVGeometry
from splitwise.transfer import wire
from splitwise.transfer.base import Endpoint
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
COMPAT = Compatibility(
    "qwen3-0.6b", KVGeometry("bfloat16", block_size=16, num_layers=28, num_kv_heads=8, head_dim=128)
)
TASK = PrefillTask(
    0,
    "r-1",
    [1, 2, 3],
    SamplingParams(temperature=0.0, max_tokens=8),
    [4, 5],
    "tcp",
    Endpoint("tcp", "127.0.0.1", 9, COMPAT.kv),
)


class Inbox:
    """A handler that records calls; ``fail`` makes it refuse them."""

    def __init__(self) -> None:
        self.calls: list[CallMessage] = []
        self.connections: list[ControlConnection] = []
        self.disconnects: list[str] = []
        self.fail: Exception | None = None

    def __call__(self, connection: ControlConnection, message: CallMessage) -> None:
        self.connections.append(connection)
        self.calls.append(message)
        if self.fail is not None:
            raise self.fail

    def on_disconnect(self, connection: ControlConnection, reason: str) -> None:
        self.disconnects.append(reason)


Scenario = Callable[[ControlServer, Inbox], Awaitable[None]]


def with_server(scenario: Scenario) -> None:
    """Run ``scenario(server, inbox)`` against a fresh P-side server on a fresh loop."""

    async def main() -> None:
        inbox = Inbox()
        server = await ControlServer(
            node_id="P0",
            token=TOKEN,
            compat=COMPAT,
            handler=inbox,
            on_disconnect=inbox.on_disconnect,
            handshake_timeout_s=1.0,
        ).start("127.0.0.1")
        try:
            await scenario(server, inbox)
        finally:
            await server.close()

    asyncio.run(asyncio.wait_for(main(), 30))


async def connect(
    server: ControlServer, *, token: str = TOKEN, compat: Compatibility = COMPAT, inbox: Inbox | None = None
) -> ControlConnection:
    inbox = inbox or Inbox()
    return await connect_control(
        "127.0.0.1",
        server.port,
        node_id="D0",
        token=token,
        compat=compat,
        handler=inbox,
        on_disconnect=inbox.on_disconnect,
    )


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Wait for something another task does (the server's side of a connection)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.005)
    return predicate()


async def assert_server_still_serves(server: ControlServer, inbox: Inbox) -> None:
    connection = await connect(server)
    await connection.call(TASK)
    assert inbox.calls[-1] == dataclasses.replace(TASK, call_id=inbox.calls[-1].call_id)
    await connection.close()


async def raw_client(server: ControlServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


def test_authenticated_rpc_both_ways() -> None:
    async def scenario(server: ControlServer, p_inbox: Inbox) -> None:
        d_inbox = Inbox()
        d_side = await connect(server, inbox=d_inbox)
        assert d_side.peer_id == "P0" and d_side.peer_compat == COMPAT

        await d_side.call(TASK)  # D -> P: the prefill task arrives intact, Ack returns
        assert len(p_inbox.calls) == 1
        received = p_inbox.calls[0]
        assert isinstance(received, PrefillTask) and received.call_id > 0
        assert dataclasses.replace(received, call_id=0) == TASK

        # P -> D on the same connection: the first token, later.
        p_side = p_inbox.connections[0]
        assert p_side.peer_id == "D0"
        await p_side.call(PrefillResult(0, "r-1", first_token_id=42, logprob=-0.5))
        assert d_inbox.calls == [PrefillResult(d_inbox.calls[0].call_id, "r-1", 42, -0.5)]

        p_inbox.fail = UnexpectedBlocksError("no such blocks", req_id="r-1")
        with pytest.raises(RemoteError, match="no such blocks") as info:
            await d_side.call(CancelRequest(0, "r-1", "client went away"))
        assert info.value.retryable is False and info.value.req_id == "r-1"
        await d_side.close()

    with_server(scenario)


def test_handler_bug_is_reported_to_the_caller_and_the_connection_survives() -> None:
    async def scenario(server: ControlServer, p_inbox: Inbox) -> None:
        connection = await connect(server)
        p_inbox.fail = KeyError("boom")
        with pytest.raises(RemoteError, match="internal error: KeyError"):
            await connection.call(TASK)
        p_inbox.fail = None
        await connection.call(TASK)
        assert len(p_inbox.calls) == 2 and server.counters.get("control_handler_errors") == 1
        await connection.close()

    with_server(scenario)


def test_wrong_token_is_refused() -> None:
    async def scenario(server: ControlServer, p_inbox: Inbox) -> None:
        with pytest.raises(AuthenticationError, match="wrong or missing cluster token"):
            await connect(server, token="guess")
        assert await until(lambda: server.counters.get("refused_auth") == 1)
        assert p_inbox.calls == []
        await assert_server_still_serves(server, p_inbox)

    with_server(scenario)


def test_missing_token_is_refused() -> None:
    async def scenario(server: ControlServer, p_inbox: Inbox) -> None:
        reader, writer = await raw_client(server)
        challenge = await wire.read_message(reader)
        assert isinstance(challenge, AuthChallenge) and len(challenge.nonce) == 32
        await wire.write_message(writer, AuthHello("intruder", b"\x00" * 32, b"", COMPAT))
        assert await wire.read_message(reader) == Refused(
            "auth", "authentication failed: wrong or missing cluster token"
        )
        with pytest.raises(ConnectionLostError):
            await wire.read_message(reader)  # and closed
        writer.close()
        assert await until(lambda: server.counters.get("refused_auth") == 1)
        await assert_server_still_serves(server, p_inbox)

    with_server(scenario)


def test_garbage_and_silence_are_refused() -> None:
    async def scenario(server: ControlServer, p_inbox: Inbox) -> None:
        _, garbage = await raw_client(server)
        garbage.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        _, silent = await raw_client(server)
        assert await until(lambda: server.counters.get("refused_protocol") == 1)
        assert await until(lambda: server.counters.get("refused_timeout") == 1)  # handshake_timeout_s=1.0
        garbage.close()
        silent.close()
        await assert_server_still_serves(server, p_inbox)

    with_server(scenario)


def test_incompatible_peer_is_refused_with_every_difference() -> None:
    async def scenario(server: ControlServer, p_inbox: Inbox) -> None:
        other = Compatibility(COMPAT.model_id, dataclasses.replace(COMPAT.kv, block_size=32, dtype="float16"))
        with pytest.raises(IncompatiblePeerError) as info:
            await connect(server, compat=other)
        assert "block_size: ours 16, peer 32" in str(info.value)
        assert "dtype: ours 'bfloat16', peer 'float16'" in str(info.value)
        assert await until(lambda: server.counters.get("refused_incompatible") == 1)
        await assert_server_still_serves(server, p_inbox)

    with_server(scenario)


def test_client_refuses_a_server_that_does_not_know_the_token() -> None:
    async def main() -> None:
        async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await wire.write_message(writer, AuthChallenge("P?", b"\x07" * 32))
            await wire.read_message(reader)
            await wire.write_message(writer, AuthWelcome("P?", b"\x00" * 32, COMPAT))
            await reader.read(1)
            writer.close()

        listener = await asyncio.start_server(impostor, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        with pytest.raises(AuthenticationError, match="server failed to prove"):
            await connect_control(
                "127.0.0.1", port, node_id="D0", token=TOKEN, compat=COMPAT, handler=Inbox()
            )
        listener.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_silent_server_is_a_connection_error_within_the_timeout() -> None:
    async def main() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1)  # never speaks (a frozen node: the kernel accepted for it)

        listener = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        with pytest.raises(ConnectionLostError, match="no handshake"):
            await connect_control(
                "127.0.0.1", port, node_id="D0", token=TOKEN, compat=COMPAT, handler=Inbox(), timeout_s=0.2
            )
        listener.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_peer_closing_fails_pending_calls_and_reports_the_disconnect() -> None:
    async def scenario(server: ControlServer, p_inbox: Inbox) -> None:
        d_inbox = Inbox()
        d_side = await connect(server, inbox=d_inbox)
        await d_side.call(TASK)
        # A call issued as P goes away (it starts only once server.close() began): no reply comes.
        pending = asyncio.ensure_future(d_side.call(CancelRequest(0, "r-1", "x"), timeout_s=10.0))
        await server.close()  # P goes away
        with pytest.raises(ConnectionLostError):
            await pending
        assert await until(lambda: bool(d_inbox.disconnects)) and d_side.is_closed
        with pytest.raises(ConnectionLostError):
            await d_side.call(TASK)

    with_server(scenario)


def test_a_handler_may_call_back_on_its_own_connection_from_a_task() -> None:
    async def scenario(server: ControlServer, p_inbox: Inbox) -> None:
        answered: list[asyncio.Task[None]] = []

        def answer_later(connection: ControlConnection, message: CallMessage) -> None:
            # The handler decides at once; the call back runs as a task on the same loop.
            answered.append(
                asyncio.ensure_future(connection.call(CancelRequest(0, message.req_id, "nested")))
            )

        d_side = await connect_control(
            "127.0.0.1", server.port, node_id="D0", token=TOKEN, compat=COMPAT, handler=answer_later
        )
        await d_side.call(TASK)
        p_side = p_inbox.connections[0]
        await p_side.call(PrefillResult(0, "r-1", 1, 0.0), timeout_s=5.0)
        await asyncio.wait_for(answered[0], 5.0)
        assert [type(m) for m in p_inbox.calls] == [PrefillTask, CancelRequest]
        await d_side.close()

    with_server(scenario)


def test_empty_token_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="--cluster-token"):
        ControlServer(node_id="P0", token="", compat=COMPAT, handler=Inbox())
