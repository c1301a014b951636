"""PDChannel: the instance's end of the P<->D control channel, on the instance's event loop.

Every instance runs a ControlServer on ``--pd-comm-port``; a decode node opens (and reuses) one
authenticated connection per prefill node. The event loop owns every request's state and the
channel runs on it too: an incoming call is handed to the flows' handler right where it is read
(the handler accepts it, and the Ack goes out, or raises, and an ErrorReply does), and an outgoing
call awaits the peer's Ack. No thread, no lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from splitwise.logging import get_logger
from splitwise.transfer.control import ControlServer, connect_control
from splitwise.transfer.control_connection import ControlConnection
from splitwise.transfer.errors import ConnectionLostError, ProtocolError
from splitwise.transfer.messages import CallMessage, Compatibility, Granted

log = get_logger(__name__)

# (connection, message): runs on the event loop before the Ack; raise a SplitwiseError to refuse.
# An awaitable returned defers the Ack until it finished (P's cancel fence, #11).
# A migration offer's handler resolves to the Granted reply instead.
MessageHandler = Callable[[ControlConnection, CallMessage], Awaitable[Granted | None] | None]
DisconnectCallback = Callable[[str], None]  # peer node id, on the event loop


class Connection(Protocol):
    """One control connection as the P/D flows see it."""

    @property
    def peer_id(self) -> str: ...
    @property
    def is_closed(self) -> bool: ...


class Channel(Protocol):
    """What the P/D flows need of the control channel (``PDChannel``; a fake in tests)."""

    async def connection_to(self, peer_id: str, host: str, port: int) -> Connection: ...
    async def call(self, conn: Connection, message: CallMessage, timeout_s: float | None = None) -> None: ...
    async def close_connection(self, conn: Connection, reason: str) -> None: ...


class PDChannel:
    def __init__(
        self,
        *,
        node_id: str,
        token: str,
        compat: Compatibility,
        on_message: MessageHandler,
        on_disconnect: DisconnectCallback | None = None,
        call_timeout_s: float = 10.0,
    ) -> None:
        self.node_id = node_id
        self._token = token
        self._compat = compat
        self._on_message = on_message
        self._on_disconnect_cb = on_disconnect
        self.call_timeout_s = call_timeout_s
        self._peers: dict[str, ControlConnection] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._server: ControlServer | None = None

    async def start(self, host: str, port: int) -> PDChannel:
        self._server = await ControlServer(
            node_id=self.node_id,
            token=self._token,
            compat=self._compat,
            handler=self._on_message,
            on_disconnect=self._disconnected,
        ).start(host, port)
        return self

    @property
    def server(self) -> ControlServer:
        assert self._server is not None, "PDChannel.start() first"
        return self._server

    @property
    def port(self) -> int:
        return self.server.port

    async def connection_to(self, peer_id: str, host: str, port: int) -> ControlConnection:
        """The open connection to ``peer_id`` (connecting once; concurrent callers share it)."""
        lock = self._connecting.setdefault(peer_id, asyncio.Lock())
        async with lock:
            conn = self._peers.get(peer_id)
            if conn is not None and not conn.is_closed:
                return conn
            conn = await connect_control(
                host,
                port,
                node_id=self.node_id,
                token=self._token,
                compat=self._compat,
                handler=self._on_message,
                on_disconnect=self._disconnected,
            )
            self._peers[peer_id] = conn
            log.info("pd control connected", peer=peer_id, address=f"{host}:{port}")
            return conn

    async def call(self, conn: Connection, message: CallMessage, timeout_s: float | None = None) -> None:
        """Send and wait for the peer's Ack (raises RemoteError / TransferTimeoutError / ConnectionLostError)."""
        assert isinstance(conn, ControlConnection)
        if conn.is_closed:
            raise ConnectionLostError(
                "control connection is closed", req_id=message.req_id, peer=conn.peer_id
            )
        await conn.call(message, timeout_s or self.call_timeout_s)

    async def call_for_grant(
        self, conn: Connection, message: CallMessage, timeout_s: float | None = None
    ) -> Granted:
        """``call`` for a message the peer answers with ``Granted`` (a migration offer)."""
        assert isinstance(conn, ControlConnection)
        if conn.is_closed:
            raise ConnectionLostError(
                "control connection is closed", req_id=message.req_id, peer=conn.peer_id
            )
        reply = await conn.call(message, timeout_s or self.call_timeout_s)
        if not isinstance(reply, Granted):
            raise ProtocolError(
                f"expected granted in reply to {message.TAG}, got {reply.TAG}", peer=conn.peer_id
            )
        return reply

    async def close_connection(self, conn: Connection, reason: str) -> None:
        assert isinstance(conn, ControlConnection)
        await conn.close(reason)

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()
        peers, self._peers = list(self._peers.values()), {}
        for conn in peers:
            await conn.close("instance shutting down")

    def _disconnected(self, conn: ControlConnection, reason: str) -> None:
        log.info("pd control disconnected", peer=conn.peer_id, reason=reason)
        if self._peers.get(conn.peer_id) is conn:
            del self._peers[conn.peer_id]
        if self._on_disconnect_cb is not None:
            self._on_disconnect_cb(conn.peer_id)
