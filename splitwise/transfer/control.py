"""The P<->D control channel on ``--pd-comm-port``: authenticated, compatibility-checked RPC.

Each node runs a ``ControlServer``; a node that needs to talk to another calls ``connect_control``.
After the handshake the connection (``ControlConnection``) is symmetric: either side may ``call``
(D sends a PrefillTask; P answers later on the same connection with PrefillResult or
PrefillFailed; either side sends CancelRequest), and the other side's ``handler`` answers with an
Ack, or an ErrorReply when it raises.

Handshake. The token never crosses the wire; both sides prove they know it, bound to fresh
nonces so a recorded exchange cannot be replayed::

    S -> C  AuthChallenge(server_id, ns)
    C -> S  AuthHello(client_id, nc, HMAC(token, "client" | ns | nc | client_id), compat)
    S       bad mac -> Refused("auth"); compat differs -> Refused("incompatible", every field); close
    S -> C  AuthWelcome(server_id, HMAC(token, "server" | nc | ns | server_id), compat)
    C       bad mac -> AuthenticationError (that server does not know the token)

Anything else (garbage bytes, silence past ``handshake_timeout_s``, a wrong message) is refused
with Refused("protocol") where possible, logged, counted, and closed; the server keeps running.
Before authentication a peer costs a bounded amount: its hello frame may declare at most
``wire.PRE_AUTH_MAX_BYTES``, the whole handshake has one deadline, and at most ``MAX_HANDSHAKING``
handshakes run at once (more connections are closed on accept).

asyncio, on the instance's one event loop: the P/D flows that call and handle these messages own
their requests' state on that loop, so a message is handled where the state lives, with no
thread hop and no lock; each handshake runs in its own task, bounded by ``handshake_timeout_s``,
so a silent client cannot stall accepting others.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from splitwise.codes import RefusalCode
from splitwise.counters import Counters
from splitwise.logging import get_logger
from splitwise.transfer import auth, wire
from splitwise.transfer.control_connection import ControlConnection, DisconnectHandler, Handler
from splitwise.transfer.errors import (
    AuthenticationError,
    ConnectionLostError,
    IncompatiblePeerError,
    ProtocolError,
    TransferError,
    TransferTimeoutError,
)
from splitwise.transfer.messages import (
    AuthChallenge,
    AuthHello,
    AuthWelcome,
    Compatibility,
    Message,
    Refused,
    expect_type,
)

log = get_logger("splitwise.transfer.control")

# Handshakes in progress per server (each also bounded by handshake_timeout_s and a hello-sized frame).
MAX_HANDSHAKING = 32


# The MAC and token rules live in splitwise.transfer.auth, shared with the rdma side channel (#11).
_token_bytes = auth.token_bytes


class ControlServer:
    """Accepts control connections: ``await ControlServer(...).start(host, port)`` on the loop
    that will own it (port 0 = any free port; see ``port``)."""

    def __init__(
        self,
        *,
        node_id: str,
        token: str | bytes,
        compat: Compatibility,
        handler: Handler,
        on_disconnect: DisconnectHandler | None = None,
        handshake_timeout_s: float = 5.0,
    ) -> None:
        self.node_id = node_id
        self.compat = compat
        self.counters = Counters()
        self._token = _token_bytes(token)
        self._handler = handler
        self._on_disconnect = on_disconnect
        self._handshake_timeout_s = handshake_timeout_s
        self._server: asyncio.Server | None = None
        self._connections: list[ControlConnection] = []
        self._handshakes: set[asyncio.Task[None]] = set()
        self._closed = False

    async def start(self, host: str = "0.0.0.0", port: int = 0) -> ControlServer:
        """Listen on ``host:port`` (0 = any free port) on the running loop."""
        self._server = await asyncio.start_server(self._accepted, host, port, reuse_address=True)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None, "ControlServer.start() first"
        return int(self._server.sockets[0].getsockname()[1])

    def connections(self) -> list[ControlConnection]:
        self._connections = [c for c in self._connections if not c.is_closed]
        return list(self._connections)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)
        for connection in self.connections():
            await connection.close("server closed")
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._handshakes) >= MAX_HANDSHAKING:
            # Unauthenticated connections are bounded: past the cap a new one is closed at once.
            self.counters.inc("refused_over_cap")
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._admit(reader, writer), name="control-handshake")
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _admit(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        address = f"{peer[0]}:{peer[1]}"
        try:
            try:
                peer_id, peer_compat = await asyncio.wait_for(
                    self._handshake(reader, writer, address), self._handshake_timeout_s
                )
            except asyncio.TimeoutError:
                raise TransferTimeoutError(
                    f"no handshake within {self._handshake_timeout_s}s", peer=address
                ) from None
        except TransferError as exc:
            self.counters.inc(f"refused_{_refusal_code(exc)}")
            log.warning("control connection refused", peer=address, code=_refusal_code(exc), reason=str(exc))
            writer.close()
            return
        connection = ControlConnection(
            reader,
            writer,
            peer_id=peer_id,
            peer_compat=peer_compat,
            handler=self._handler,
            on_disconnect=self._on_disconnect,
            counters=self.counters,
        )
        self._connections.append(connection)
        self.counters.inc("connections_accepted")
        log.info("control connection accepted", peer=peer_id, address=address)
        connection.start()

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str
    ) -> tuple[str, Compatibility]:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        challenge = auth.new_challenge(self.node_id)
        await wire.write_message(writer, challenge)
        try:
            hello = expect_type(await wire.read_message(reader, max_bytes=wire.PRE_AUTH_MAX_BYTES), AuthHello)
        except ProtocolError as exc:
            await _try_send(writer, Refused(RefusalCode.PROTOCOL, str(exc)))
            raise
        if not auth.hello_is_authentic(hello, challenge, token=self._token):
            await _try_send(writer, Refused(RefusalCode.AUTH, auth.AUTH_FAILED))
            raise AuthenticationError(auth.AUTH_FAILED, peer=address)
        peer_compat = hello.compat
        mismatches = self.compat.mismatches(peer_compat)
        if mismatches:
            reason = "incompatible peer: " + "; ".join(mismatches)
            await _try_send(writer, Refused(RefusalCode.INCOMPATIBLE, reason))
            raise IncompatiblePeerError(reason, peer=hello.client_id)
        await wire.write_message(
            writer, auth.welcome_for(hello, challenge, token=self._token, compat=self.compat)
        )
        return hello.client_id, peer_compat


async def connect_control(
    host: str,
    port: int,
    *,
    node_id: str,
    token: str | bytes,
    compat: Compatibility,
    handler: Handler,
    on_disconnect: DisconnectHandler | None = None,
    timeout_s: float = 5.0,
) -> ControlConnection:
    """Connect, authenticate both ways, check compatibility, within ``timeout_s``. Raises
    AuthenticationError, IncompatiblePeerError (with the server's reason), ConnectionLostError
    (also for a server that does not answer in time), ProtocolError."""
    raw_token = _token_bytes(token)
    address = f"{host}:{port}"
    reader, writer = await wire.open_connection(host, port, timeout_s)
    try:
        welcome, peer_compat = await asyncio.wait_for(
            _client_handshake(reader, writer, raw_token, node_id, compat, address), timeout_s
        )
    except asyncio.TimeoutError:
        writer.close()
        raise ConnectionLostError(f"no handshake from {address} within {timeout_s}s", peer=address) from None
    except BaseException:
        writer.close()
        raise
    return ControlConnection(
        reader,
        writer,
        peer_id=welcome.server_id,
        peer_compat=peer_compat,
        handler=handler,
        on_disconnect=on_disconnect,
        counters=Counters(),
    ).start()


async def _client_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    token: bytes,
    node_id: str,
    compat: Compatibility,
    address: str,
) -> tuple[AuthWelcome, Compatibility]:
    challenge = expect_type(await wire.read_message(reader), AuthChallenge)
    hello = auth.hello_for(challenge, token=token, client_id=node_id, compat=compat)
    await wire.write_message(writer, hello)
    reply: Message = await wire.read_message(reader)
    if isinstance(reply, Refused):
        raise _refusal_error(reply, address)
    welcome: AuthWelcome = expect_type(reply, AuthWelcome)
    if not auth.welcome_is_authentic(welcome, hello, challenge, token=token):
        raise AuthenticationError("server failed to prove the cluster token", peer=address)
    peer_compat = welcome.compat
    mismatches = compat.mismatches(peer_compat)
    if mismatches:
        raise IncompatiblePeerError("incompatible peer: " + "; ".join(mismatches), peer=address)
    return welcome, peer_compat


def _refusal_error(refused: Refused, address: str) -> TransferError:
    reason = f"refused by server: {refused.reason}"
    if refused.code is RefusalCode.AUTH:
        return AuthenticationError(reason, peer=address)
    if refused.code is RefusalCode.INCOMPATIBLE:
        return IncompatiblePeerError(reason, peer=address)
    return ProtocolError(reason, peer=address)


def _refusal_code(exc: TransferError) -> str:
    if isinstance(exc, AuthenticationError):
        return "auth"
    if isinstance(exc, IncompatiblePeerError):
        return "incompatible"
    if isinstance(exc, ConnectionLostError):
        return "disconnected"
    if isinstance(exc, TransferTimeoutError):
        return "timeout"
    return "protocol"


async def _try_send(writer: asyncio.StreamWriter, message: Message) -> None:
    try:
        await wire.write_message(writer, message)
    except ConnectionLostError:
        pass  # the peer is already gone; the refusal is logged by the caller


__all__ = ["Compatibility", "ControlConnection", "ControlServer", "connect_control"]
