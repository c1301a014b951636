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

Threads, not asyncio: the callers are the engine loop (its own thread) and the scheduler, which
call synchronously with a timeout; traffic is a handful of small messages per request, so a
reader thread per connection (tens of peers) costs nothing, while asyncio would force every
caller to hop into an event loop. The asyncio HTTP server can call through ``run_in_executor``.
"""

from __future__ import annotations

import hmac
import os
import socket
import threading

from splitwise.logging import get_logger
from splitwise.transfer import auth, wire
from splitwise.transfer.base import TransferCounters
from splitwise.transfer.control_connection import Compatibility, ControlConnection, DisconnectHandler, Handler
from splitwise.transfer.errors import (
    AuthenticationError,
    ConnectionLostError,
    IncompatiblePeerError,
    ProtocolError,
    TransferError,
    TransferTimeoutError,
)
from splitwise.transfer.messages import AuthChallenge, AuthHello, AuthWelcome, Message, Refused, expect_type

log = get_logger("splitwise.transfer.control")

_NONCE_BYTES = auth.NONCE_BYTES


# The MAC and token rules live in splitwise.transfer.auth, shared with the rdma side channel (#11).
_mac = auth.mac
_token_bytes = auth.token_bytes


class ControlServer:
    """Accepts control connections on ``host:port`` (0 = any free port; see ``port`` after start)."""

    def __init__(
        self,
        *,
        node_id: str,
        token: str | bytes,
        compat: Compatibility,
        handler: Handler,
        on_disconnect: DisconnectHandler | None = None,
        host: str = "0.0.0.0",
        port: int = 0,
        handshake_timeout_s: float = 5.0,
    ) -> None:
        self.node_id = node_id
        self.compat = compat
        self.counters = TransferCounters()
        self._token = _token_bytes(token)
        self._handler = handler
        self._on_disconnect = on_disconnect
        self._handshake_timeout_s = handshake_timeout_s
        self._listener = wire.listen(host, port)
        self._lock = threading.Lock()
        self._connections: list[ControlConnection] = []
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, name="control-accept", daemon=True)
        self._acceptor.start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def connections(self) -> list[ControlConnection]:
        with self._lock:
            self._connections = [c for c in self._connections if not c.is_closed]
            return list(self._connections)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not listening any more
        self._acceptor.join(timeout=5.0)
        self._listener.close()
        for connection in self.connections():
            connection.close("server closed")

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                sock, addr = self._listener.accept()
            except OSError as exc:
                if not self._closed.is_set():
                    self.counters.incr("accept_errors")
                    log.error("control accept failed", error=str(exc))
                continue
            # The handshake runs on its own thread so a silent client cannot stall accepting others.
            threading.Thread(
                target=self._admit, args=(sock, f"{addr[0]}:{addr[1]}"), daemon=True, name="control-handshake"
            ).start()

    def _admit(self, sock: socket.socket, address: str) -> None:
        try:
            peer_id, peer_compat = self._handshake(sock, address)
        except TransferError as exc:
            self.counters.incr(f"refused_{_refusal_code(exc)}")
            log.warning("control connection refused", peer=address, code=_refusal_code(exc), reason=str(exc))
            sock.close()
            return
        connection = ControlConnection(
            sock,
            peer_id=peer_id,
            peer_compat=peer_compat,
            handler=self._handler,
            on_disconnect=self._on_disconnect,
            counters=self.counters,
        )
        with self._lock:
            self._connections.append(connection)
        self.counters.incr("connections_accepted")
        log.info("control connection accepted", peer=peer_id, address=address)
        connection.start()

    def _handshake(self, sock: socket.socket, address: str) -> tuple[str, Compatibility]:
        sock.settimeout(self._handshake_timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server_nonce = os.urandom(_NONCE_BYTES)
        wire.send_message(sock, AuthChallenge(self.node_id, server_nonce))
        try:
            hello = expect_type(wire.recv_message(sock), AuthHello)
        except ProtocolError as exc:
            _try_send(sock, Refused("protocol", str(exc)))
            raise
        expected = _mac(self._token, b"client", server_nonce, hello.nonce, hello.client_id)
        if len(hello.nonce) != _NONCE_BYTES or not hmac.compare_digest(expected, hello.mac):
            _try_send(sock, Refused("auth", "authentication failed: wrong or missing cluster token"))
            raise AuthenticationError("authentication failed: wrong or missing cluster token", peer=address)
        try:
            peer_compat = Compatibility.from_dict(hello.compat)
        except (ProtocolError, TypeError) as exc:
            _try_send(sock, Refused("protocol", f"bad compatibility record: {exc}"))
            raise ProtocolError(f"bad compatibility record: {exc}", peer=hello.client_id) from None
        mismatches = self.compat.mismatches(peer_compat)
        if mismatches:
            reason = "incompatible peer: " + "; ".join(mismatches)
            _try_send(sock, Refused("incompatible", reason))
            raise IncompatiblePeerError(reason, peer=hello.client_id)
        mac = _mac(self._token, b"server", hello.nonce, server_nonce, self.node_id)
        wire.send_message(sock, AuthWelcome(self.node_id, mac, self.compat.to_dict()))
        sock.settimeout(None)
        return hello.client_id, peer_compat


def connect_control(
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
    """Connect, authenticate both ways, check compatibility. Raises AuthenticationError,
    IncompatiblePeerError (with the server's reason), ConnectionLostError, ProtocolError."""
    raw_token = _token_bytes(token)
    address = f"{host}:{port}"
    sock = wire.connect(host, port, timeout_s)
    try:
        challenge = expect_type(wire.recv_message(sock), AuthChallenge)
        nonce = os.urandom(_NONCE_BYTES)
        mac = _mac(raw_token, b"client", challenge.nonce, nonce, node_id)
        wire.send_message(sock, AuthHello(node_id, nonce, mac, compat.to_dict()))
        reply: Message = wire.recv_message(sock)
        if isinstance(reply, Refused):
            raise _refusal_error(reply, address)
        welcome = expect_type(reply, AuthWelcome)
        expected = _mac(raw_token, b"server", nonce, challenge.nonce, welcome.server_id)
        if not hmac.compare_digest(expected, welcome.mac):
            raise AuthenticationError("server failed to prove the cluster token", peer=address)
        peer_compat = Compatibility.from_dict(welcome.compat)
        mismatches = compat.mismatches(peer_compat)
        if mismatches:
            raise IncompatiblePeerError("incompatible peer: " + "; ".join(mismatches), peer=address)
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    counters = TransferCounters()
    return ControlConnection(
        sock,
        peer_id=welcome.server_id,
        peer_compat=peer_compat,
        handler=handler,
        on_disconnect=on_disconnect,
        counters=counters,
    ).start()


def _refusal_error(refused: Refused, address: str) -> TransferError:
    reason = f"refused by server: {refused.reason}"
    if refused.code == "auth":
        return AuthenticationError(reason, peer=address)
    if refused.code == "incompatible":
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


def _try_send(sock: socket.socket, message: Message) -> None:
    try:
        wire.send_message(sock, message)
    except ConnectionLostError:
        pass  # the peer is already gone; the refusal is logged by the caller


__all__ = ["Compatibility", "ControlConnection", "ControlServer", "connect_control"]
