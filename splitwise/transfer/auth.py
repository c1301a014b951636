"""The cluster-token challenge, shared by the P<->D control channel and the rdma side channel.

The token never crosses the wire; both sides prove they know it, bound to fresh nonces so a
recorded exchange cannot be replayed, and to a ``domain`` so a proof made for one channel is
worthless on another (the control channel's domain is ``splitwise-pd-v1``)::

    S -> C  AuthChallenge(server_id, ns)
    C -> S  AuthHello(client_id, nc, HMAC(token, domain | "client" | ns | nc | client_id), compat)
    S       bad mac -> Refused("auth"), AuthenticationError
    S -> C  AuthWelcome(server_id, HMAC(token, domain | "server" | nc | ns | server_id), compat)
    C       bad mac -> AuthenticationError (that server does not know the token)

``new_challenge``/``hello_for``/``hello_is_authentic``/``welcome_for``/``welcome_is_authentic`` are
its steps, with no I/O: the asyncio control channel runs them with its compatibility check in
between; ``serve_challenge``/``answer_challenge`` run them over a blocking socket for a channel
that needs nothing else from the exchange (the rdma side channel, which sends its geometry as
``compat`` and checks it in its own hello).
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
from splitwise.transfer import wire
from splitwise.transfer.errors import AuthenticationError, ConnectionLostError, ProtocolError
from splitwise.transfer.messages import (
    AuthChallenge,
    AuthHello,
    AuthWelcome,
    Compatibility,
    Message,
    Refused,
    expect_type,
)

NONCE_BYTES = 32
PRE_AUTH_MAX_BYTES = 4096  # an AuthHello is ~200 bytes; anything bigger before auth is refused
CONTROL_DOMAIN = b"splitwise-pd-v1"
AUTH_FAILED = "authentication failed: wrong or missing cluster token"


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


# The exchange's steps, shared by both channels (each does its own I/O around them).
def new_challenge(server_id: str) -> AuthChallenge:
    return AuthChallenge(server_id, os.urandom(NONCE_BYTES))


def hello_for(
    challenge: AuthChallenge,
    *,
    token: bytes,
    client_id: str,
    compat: Compatibility,
    domain: bytes = CONTROL_DOMAIN,
) -> AuthHello:
    """The client's answer: a fresh nonce and its proof of the token, bound to both nonces."""
    nonce = os.urandom(NONCE_BYTES)
    return AuthHello(
        client_id, nonce, mac(token, b"client", challenge.nonce, nonce, client_id, domain=domain), compat
    )


def hello_is_authentic(
    hello: AuthHello, challenge: AuthChallenge, *, token: bytes, domain: bytes = CONTROL_DOMAIN
) -> bool:
    expected = mac(token, b"client", challenge.nonce, hello.nonce, hello.client_id, domain=domain)
    return len(hello.nonce) == NONCE_BYTES and hmac.compare_digest(expected, hello.mac)


def welcome_for(
    hello: AuthHello,
    challenge: AuthChallenge,
    *,
    token: bytes,
    compat: Compatibility,
    domain: bytes = CONTROL_DOMAIN,
) -> AuthWelcome:
    """The server's proof of the token, bound to both nonces (the hello's first)."""
    server_id = challenge.server_id
    return AuthWelcome(
        server_id, mac(token, b"server", hello.nonce, challenge.nonce, server_id, domain=domain), compat
    )


def welcome_is_authentic(
    welcome: AuthWelcome,
    hello: AuthHello,
    challenge: AuthChallenge,
    *,
    token: bytes,
    domain: bytes = CONTROL_DOMAIN,
) -> bool:
    expected = mac(token, b"server", hello.nonce, challenge.nonce, welcome.server_id, domain=domain)
    return hmac.compare_digest(expected, welcome.mac)


def _recv(sock: socket.socket, deadline: float) -> Message:
    return wire.recv_message(sock, max_bytes=PRE_AUTH_MAX_BYTES, deadline=deadline)


def _try_send(sock: socket.socket, message: Message) -> None:
    try:
        wire.send_message(sock, message)
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
    deadline = time.monotonic() + timeout_s
    challenge = new_challenge(server_id)
    wire.send_message(sock, challenge)
    try:
        hello = expect_type(_recv(sock, deadline), AuthHello)
    except ProtocolError as exc:
        _try_send(sock, Refused(RefusalCode.PROTOCOL, str(exc)))
        raise
    if not hello_is_authentic(hello, challenge, token=token, domain=domain):
        _try_send(sock, Refused(RefusalCode.AUTH, AUTH_FAILED))
        raise AuthenticationError(AUTH_FAILED)
    wire.send_message(sock, welcome_for(hello, challenge, token=token, compat=compat, domain=domain))
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
    deadline = time.monotonic() + timeout_s
    challenge = expect_type(_recv(sock, deadline), AuthChallenge)
    hello = hello_for(challenge, token=token, client_id=client_id, compat=compat, domain=domain)
    wire.send_message(sock, hello)
    reply = _recv(sock, deadline)
    if isinstance(reply, Refused):
        raise AuthenticationError(f"refused by the server: {reply.reason}")
    welcome = expect_type(reply, AuthWelcome)
    if not welcome_is_authentic(welcome, hello, challenge, token=token, domain=domain):
        raise AuthenticationError("the server failed to prove the cluster token")
    return str(welcome.server_id)
