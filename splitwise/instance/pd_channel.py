"""PDChannel: the instance's end of the P<->D control channel, bridged to asyncio.

Every instance runs a ControlServer on ``--pd-comm-port``; a decode node opens (and reuses) one
authenticated connection per prefill node. Incoming calls arrive on a connection's reader thread,
which must not block: the handler only validates and hands the message to the event loop, where
the prefill/decode flows handle it. Outgoing calls block for the peer's Ack, so they run in the
default executor.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from splitwise.logging import get_logger
from splitwise.transfer.control import ControlServer, connect_control
from splitwise.transfer.control_connection import Compatibility, ControlConnection
from splitwise.transfer.errors import ConnectionLostError
from splitwise.transfer.messages import CallMessage

log = get_logger(__name__)

# (connection, message): runs on the event loop.
MessageHandler = Callable[[ControlConnection, CallMessage], None]
# Runs on the reader thread before the Ack: raise a SplitwiseError to refuse the call.
Validator = Callable[[ControlConnection, CallMessage], None]
DisconnectCallback = Callable[[str], None]  # peer node id, on the event loop


class PDChannel:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        node_id: str,
        token: str,
        compat: Compatibility,
        host: str,
        port: int,
        on_message: MessageHandler,
        validate: Validator | None = None,
        on_disconnect: DisconnectCallback | None = None,
        call_timeout_s: float = 10.0,
    ) -> None:
        self._loop = loop
        self.node_id = node_id
        self._token = token
        self._compat = compat
        self._on_message = on_message
        self._validate = validate
        self._on_disconnect_cb = on_disconnect
        self.call_timeout_s = call_timeout_s
        self._lock = threading.Lock()
        self._peers: dict[str, ControlConnection] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self.server = ControlServer(
            node_id=node_id,
            token=token,
            compat=compat,
            handler=self._handle,
            on_disconnect=self._disconnected,
            host=host,
            port=port,
        )

    @property
    def port(self) -> int:
        return self.server.port

    async def connection_to(self, peer_id: str, host: str, port: int) -> ControlConnection:
        """The open connection to ``peer_id`` (connecting once; concurrent callers share it)."""
        lock = self._connecting.setdefault(peer_id, asyncio.Lock())
        async with lock:
            with self._lock:
                conn = self._peers.get(peer_id)
            if conn is not None and not conn.is_closed:
                return conn
            conn = await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: connect_control(
                    host,
                    port,
                    node_id=self.node_id,
                    token=self._token,
                    compat=self._compat,
                    handler=self._handle,
                    on_disconnect=self._disconnected,
                ),
            )
            with self._lock:
                self._peers[peer_id] = conn
            log.info("pd control connected", peer=peer_id, address=f"{host}:{port}")
            return conn

    async def call(
        self, conn: ControlConnection, message: CallMessage, timeout_s: float | None = None
    ) -> None:
        """Send and wait for the peer's Ack (raises RemoteError / TransferTimeoutError / ConnectionLostError)."""
        if conn.is_closed:
            raise ConnectionLostError(
                "control connection is closed", req_id=message.req_id, peer=conn.peer_id
            )
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: conn.call(message, timeout_s or self.call_timeout_s)
        )

    def close(self) -> None:
        self.server.close()
        with self._lock:
            peers, self._peers = list(self._peers.values()), {}
        for conn in peers:
            conn.close("instance shutting down")

    # -- reader-thread side -------------------------------------------------------------------

    def _handle(self, conn: ControlConnection, message: CallMessage) -> None:
        if self._validate is not None:
            self._validate(conn, message)
        self._loop.call_soon_threadsafe(self._on_message, conn, message)

    def _disconnected(self, conn: ControlConnection, reason: str) -> None:
        log.info("pd control disconnected", peer=conn.peer_id, reason=reason)
        with self._lock:
            if self._peers.get(conn.peer_id) is conn:
                del self._peers[conn.peer_id]
        if self._on_disconnect_cb is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_disconnect_cb, conn.peer_id)
