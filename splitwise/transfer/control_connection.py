"""One authenticated P<->D control connection: symmetric RPC with Ack/ErrorReply replies.

Built by ``control.py`` after the handshake; see there for the channel as a whole.
"""

from __future__ import annotations

import dataclasses
import itertools
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from splitwise.errors import SplitwiseError
from splitwise.logging import get_logger
from splitwise.transfer import wire
from splitwise.transfer.base import TransferCounters
from splitwise.transfer.errors import (
    ConnectionLostError,
    ProtocolError,
    RemoteError,
    TransferError,
    TransferTimeoutError,
)
from splitwise.transfer.messages import (
    Ack,
    CallMessage,
    CancelRequest,
    ErrorReply,
    Message,
    PrefillFailed,
    PrefillResult,
    PrefillTask,
)

log = get_logger("splitwise.transfer.control")


@dataclass(frozen=True)
class Compatibility:
    """What two nodes must agree on to exchange KV blocks."""

    model_id: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Compatibility:
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise ProtocolError(f"compatibility fields {sorted(data)} != {sorted(names)}")
        return cls(**data)

    def mismatches(self, other: Compatibility) -> list[str]:
        return [
            f"{f.name}: ours {getattr(self, f.name)!r}, peer {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


Handler = Callable[["ControlConnection", CallMessage], None]
DisconnectHandler = Callable[["ControlConnection", str], None]


class ControlConnection:
    """One authenticated connection. ``call`` is thread-safe and blocks for the reply; incoming
    calls run ``handler`` on this connection's reader thread (so it must not block, and must not
    ``call`` back on the same connection: that would wait for a reply only this thread can read)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        peer_id: str,
        peer_compat: Compatibility,
        handler: Handler,
        on_disconnect: DisconnectHandler | None,
        counters: TransferCounters,
    ) -> None:
        self.peer_id = peer_id
        self.peer_compat = peer_compat
        self._sock = sock
        self._handler = handler
        self._on_disconnect = on_disconnect
        self._counters = counters
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._call_ids = itertools.count(1)
        self._pending: dict[int, tuple[threading.Event, list[Message]]] = {}
        self._closed_reason: str | None = None
        self._reader = threading.Thread(target=self._read_loop, name=f"control-{peer_id}", daemon=True)

    def start(self) -> ControlConnection:
        self._reader.start()
        return self

    @property
    def is_closed(self) -> bool:
        return self._closed_reason is not None

    def call(self, message: CallMessage, timeout_s: float = 10.0) -> None:
        """Send ``message`` (its call_id is assigned here; pass 0) and wait for the peer's Ack.
        Raises RemoteError (peer's ErrorReply, with its ``retryable``), TransferTimeoutError,
        ConnectionLostError."""
        if threading.current_thread() is self._reader:
            raise TransferError("call() from this connection's handler would deadlock", peer=self.peer_id)
        req_id = message.req_id
        call_id = next(self._call_ids)
        slot: tuple[threading.Event, list[Message]] = (threading.Event(), [])
        with self._lock:
            if self._closed_reason is not None:
                raise ConnectionLostError(
                    f"control connection closed: {self._closed_reason}", req_id=req_id, peer=self.peer_id
                )
            self._pending[call_id] = slot
        try:
            self._send(dataclasses.replace(message, call_id=call_id))
            if not slot[0].wait(timeout_s):
                raise TransferTimeoutError(
                    f"no reply to {message.TAG} within {timeout_s}s", req_id=req_id, peer=self.peer_id
                )
        finally:
            with self._lock:
                self._pending.pop(call_id, None)
        if not slot[1]:
            raise ConnectionLostError(
                f"control connection closed: {self._closed_reason}", req_id=req_id, peer=self.peer_id
            )
        reply = slot[1][0]
        if isinstance(reply, ErrorReply):
            error = RemoteError(
                f"peer refused {message.TAG}: {reply.reason}", req_id=req_id, peer=self.peer_id
            )
            error.retryable = reply.retryable
            raise error

    def close(self, reason: str = "closed locally") -> None:
        self._mark_closed(reason)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone
        if threading.current_thread() is not self._reader and self._reader.is_alive():
            self._reader.join(timeout=5.0)
        self._sock.close()

    def _send(self, message: Message) -> None:
        with self._send_lock:
            wire.send_message(self._sock, message)

    def _read_loop(self) -> None:
        reason = "peer closed the connection"
        try:
            while True:
                message = wire.recv_message(self._sock)
                if isinstance(message, (Ack, ErrorReply)):
                    self._resolve(message)
                elif isinstance(message, (PrefillTask, PrefillResult, PrefillFailed, CancelRequest)):
                    self._send(self._handle(message))
                else:
                    raise ProtocolError(f"unexpected {message.TAG} after the handshake", peer=self.peer_id)
        except (ConnectionLostError, ProtocolError) as exc:
            reason = str(exc)
            if isinstance(exc, ProtocolError):
                self._counters.incr("control_protocol_errors")
                log.warning("control connection broken", peer=self.peer_id, reason=reason)
        self._mark_closed(reason)
        if self._on_disconnect is not None:
            self._on_disconnect(self, reason)

    def _handle(self, message: CallMessage) -> Ack | ErrorReply:
        try:
            self._handler(self, message)
        except SplitwiseError as exc:
            self._counters.incr("control_calls_refused")
            log.warning(
                "control call refused",
                peer=self.peer_id,
                req_id=message.req_id,
                tag=message.TAG,
                reason=str(exc),
            )
            return ErrorReply(message.call_id, str(exc), exc.retryable)
        except Exception as exc:  # a handler bug must reach the caller, not kill the connection
            self._counters.incr("control_handler_errors")
            log.exception("control handler failed", peer=self.peer_id, req_id=message.req_id, tag=message.TAG)
            return ErrorReply(message.call_id, f"internal error: {type(exc).__name__}: {exc}", False)
        return Ack(message.call_id)

    def _resolve(self, reply: Ack | ErrorReply) -> None:
        with self._lock:
            slot = self._pending.get(reply.call_id)
        if slot is None:
            self._counters.incr("control_late_replies")
            log.info("reply for an unknown or timed-out call", peer=self.peer_id, call_id=reply.call_id)
            return
        slot[1].append(reply)
        slot[0].set()

    def _mark_closed(self, reason: str) -> None:
        with self._lock:
            if self._closed_reason is None:
                self._closed_reason = reason
            pending = list(self._pending.values())
        for event, _ in pending:
            event.set()  # waiters see no reply and raise ConnectionLostError
