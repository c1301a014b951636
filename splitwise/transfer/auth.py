"""The cluster-token challenge, shared by the P<->D control channel and the rdma side channel.

The token never crosses the wire; both sides prove they know it, bound to fresh nonces so a
recorded exchange cannot be replayed, and to a ``domain`` so a proof made for one channel is
worthless on another (the control channel's domain is ``splitwise-pd-v1``)::

    S -> C  AuthChallenge(server_id, ns)
    C -> S  AuthHello(client_id, nc, HMAC(token, domain | "client" | ns | nc | client_id), compat)
    S       bad mac -> Refused("auth"), AuthenticationError
    S -> C  AuthWelcome(server_id, HMAC(token, domain | "server" | nc | ns | server_id), compat)
    C       bad mac -> AuthenticationError (that server does not know the token)

``serve_challenge``/``answer_challenge`` run that exchange for a channel that needs nothing else
from it (the rdma side channel, which sends its geometry as ``compat`` and checks it in its own
hello; the control channel adds its compatibility check around ``mac``).
Before authentication a frame may be at most ``PRE_AUTH_MAX_BYTES`` and the whole exchange must
finish by a deadline, so garbage, huge length prefixes and slow clients cost the server a bounded
read and one thread for a bounded time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import time

from splitwise.codes import RefusalCode
from splitwise.framing import pack_frame, recv_frame
from splitwise.transfer.errors import (
    AuthenticationError,
    ConnectionLostError,
    ProtocolError,
    TransferTimeoutError,
)
from splitwise.transfer.messages import (
    AuthChallenge,
    AuthHello,
    AuthWelcome,
    Compatibility,
    Message,
    Refused,
    decode,
    encode,
    expect_type,
)

NONCE_BYTES = 32
PRE_AUTH_MAX_BYTES = 4096  # an AuthHello is ~200 bytes; anything bigger before auth is refused
CONTROL_DOMAIN = b"splitwise-pd-v1"


def mac(
    token: bytes, role: bytes, first: bytes, second: bytes, node_id: str, *, domain: bytes = CONTROL_DOMAIN
) -> bytes:
    message = domain + b"|" + role + b"|" + first + second + node_id.encode()
    return hmac.new(token, message, hashlib.sha256).digest()


def token_bytes(token: str | bytes) -> bytes:
    raw = token.encode() if isinstance(token, str) else token
    if not raw:
        raise ValueError("--cluster-token: empty; set it or SPLITWISE_CLUSTER_TOKEN")
    return raw


class _Deadline:
    """One deadline for a whole exchange: every read gets only the time that is left."""

    def __init__(self, timeout_s: float) -> None:
        self.end = time.monotonic() + timeout_s

    def fill(self, sock: socket.socket, view: memoryview) -> None:
        view = view.cast("B")
        got = 0
        while got < len(view):
            left = self.end - time.monotonic()
            if left <= 0:
                raise TransferTimeoutError("handshake deadline passed")
            sock.settimeout(left)
            try:
                n = sock.recv_into(view[got:])
            except TimeoutError:
                raise TransferTimeoutError("handshake deadline passed") from None
            except OSError as exc:
                raise ConnectionLostError(f"handshake read failed: {exc}") from None
            if n == 0:
                raise ConnectionLostError("peer closed the connection during the handshake")
            got += n


def _recv(sock: socket.socket, deadline: _Deadline) -> Message:
    return decode(recv_frame(sock, max_bytes=PRE_AUTH_MAX_BYTES, error=ProtocolError, fill=deadline.fill))


def _send(sock: socket.socket, message: Message) -> None:
    try:
        sock.sendall(pack_frame(encode(message)))
    except OSError as exc:
        raise ConnectionLostError(f"handshake send failed: {exc}") from None


def _try_send(sock: socket.socket, message: Message) -> None:
    try:
        _send(sock, message)
    except ConnectionLostError:
        pass  # the peer is gone already; the caller logs the refusal


def serve_challenge(
    sock: socket.socket,
    *,
    token: bytes,
    server_id: str,
    domain: bytes,
    timeout_s: float,
    compat: Compatibility,
) -> str:
    """Server side; returns the authenticated client id. Raises AuthenticationError, ProtocolError
    (garbage, oversize frame, wrong message), TransferTimeoutError, ConnectionLostError, after
    sending Refused where the peer can still read it."""
    deadline = _Deadline(timeout_s)
    server_nonce = os.urandom(NONCE_BYTES)
    _send(sock, AuthChallenge(server_id, server_nonce))
    try:
        hello = expect_type(_recv(sock, deadline), AuthHello)
    except ProtocolError as exc:
        _try_send(sock, Refused(RefusalCode.PROTOCOL, str(exc)))
        raise
    expected = mac(token, b"client", server_nonce, hello.nonce, hello.client_id, domain=domain)
    if len(hello.nonce) != NONCE_BYTES or not hmac.compare_digest(expected, hello.mac):
        _try_send(sock, Refused(RefusalCode.AUTH, "authentication failed: wrong or missing cluster token"))
        raise AuthenticationError("authentication failed: wrong or missing cluster token")
    proof = mac(token, b"server", hello.nonce, server_nonce, server_id, domain=domain)
    _send(sock, AuthWelcome(server_id, proof, compat))
    return str(hello.client_id)


def answer_challenge(
    sock: socket.socket,
    *,
    token: bytes,
    client_id: str,
    domain: bytes,
    timeout_s: float,
    compat: Compatibility,
) -> str:
    """Client side; returns the authenticated server id. Raises AuthenticationError (refused, or
    the server does not know the token), ProtocolError, TransferTimeoutError, ConnectionLostError."""
    deadline = _Deadline(timeout_s)
    challenge = expect_type(_recv(sock, deadline), AuthChallenge)
    nonce = os.urandom(NONCE_BYTES)
    proof = mac(token, b"client", challenge.nonce, nonce, client_id, domain=domain)
    _send(sock, AuthHello(client_id, nonce, proof, compat))
    reply = _recv(sock, deadline)
    if isinstance(reply, Refused):
        raise AuthenticationError(f"refused by the server: {reply.reason}")
    welcome = expect_type(reply, AuthWelcome)
    expected = mac(token, b"server", nonce, challenge.nonce, welcome.server_id, domain=domain)
    if not hmac.compare_digest(expected, welcome.mac):
        raise AuthenticationError("the server failed to prove the cluster token")
    return str(welcome.server_id)
