"""One authenticated P<->D control connection: symmetric RPC with Ack/ErrorReply replies.

Built by ``control.py`` after the handshake; see there for the channel as a whole. Everything runs
on the event loop that owns the connection: a reader task reads frames, resolves the futures of
our calls with their replies, and runs ``handler`` for the peer's calls; its Ack (or ErrorReply,
when the handler raises) goes out right after the handler returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from collections.abc import Awaitable, Callable

from splitwise.counters import Counters
from splitwise.errors import SplitwiseError
from splitwise.logging import get_logger
from splitwise.transfer import wire
from splitwise.transfer.errors import ConnectionLostError, ProtocolError, RemoteError, TransferTimeoutError
from splitwise.transfer.messages import (
    CALL_TYPES,
    Ack,
    CallMessage,
    Compatibility,
    ErrorReply,
    Granted,
    Message,
)

log = get_logger("splitwise.transfer.control")


# On the loop; raise to refuse. A handler may return an awaitable: the Ack (or the ErrorReply, if
# it raises) then goes out once it finished, while the reader goes on reading (a cancel's fence).
# An awaitable that resolves to a ``Granted`` sends that as the reply instead (a migration offer).
Handler = Callable[["ControlConnection", CallMessage], Awaitable[Granted | None] | None]
DisconnectHandler = Callable[["ControlConnection", str], None]  # on the loop, once

_CLOSE_WAIT_S = 2.0  # how long close() waits for the transport to flush and shut


class ControlConnection:
    """One authenticated connection. ``call`` sends and waits for the peer's reply; incoming calls
    run ``handler`` on the loop (synchronously: it decides at once, and may start tasks that
    ``call`` back on this connection)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        peer_id: str,
        peer_compat: Compatibility,
        handler: Handler,
        on_disconnect: DisconnectHandler | None,
        counters: Counters,
    ) -> None:
        self.peer_id = peer_id
        self.peer_compat = peer_compat
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._on_disconnect = on_disconnect
        self._counters = counters
        self._send_lock = asyncio.Lock()
        self._call_ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message | None]] = {}
        self._closed_reason: str | None = None
        self._read_task: asyncio.Task[None] | None = None
        self._answers: set[asyncio.Task[None]] = set()  # replies waiting for a handler's awaitable

    def start(self) -> ControlConnection:
        self._read_task = asyncio.get_running_loop().create_task(
            self._read_loop(), name=f"control-{self.peer_id}"
        )
        return self

    @property
    def is_closed(self) -> bool:
        return self._closed_reason is not None

    async def call(self, message: CallMessage, timeout_s: float = 10.0) -> Ack | Granted:
        """Send ``message`` (its call_id is assigned here; pass 0) and wait for the peer's Ack (or
        Granted). Raises RemoteError (peer's ErrorReply, with its ``retryable``), TransferTimeoutError,
        ConnectionLostError."""
        req_id = message.req_id
        if self._closed_reason is not None:
            raise ConnectionLostError(
                f"control connection closed: {self._closed_reason}", req_id=req_id, peer=self.peer_id
            )
        call_id = next(self._call_ids)
        reply_future: asyncio.Future[Message | None] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = reply_future
        try:
            await self._send(dataclasses.replace(message, call_id=call_id))
            reply = await asyncio.wait_for(reply_future, timeout_s)
        except asyncio.TimeoutError:
            raise TransferTimeoutError(
                f"no reply to {message.TAG} within {timeout_s}s", req_id=req_id, peer=self.peer_id
            ) from None
        finally:
            self._pending.pop(call_id, None)
        if reply is None:
            raise ConnectionLostError(
                f"control connection closed: {self._closed_reason}", req_id=req_id, peer=self.peer_id
            )
        if isinstance(reply, ErrorReply):
            error = RemoteError(
                f"peer refused {message.TAG}: {reply.reason}", req_id=req_id, peer=self.peer_id
            )
            error.retryable = reply.retryable
            raise error
        assert isinstance(reply, (Ack, Granted))
        return reply

    async def close(self, reason: str = "closed locally") -> None:
        self._mark_closed(reason)
        self._writer.close()
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), _CLOSE_WAIT_S)
        task = self._read_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        answers = [t for t in self._answers if t is not asyncio.current_task()]
        for answer in answers:
            answer.cancel()
        await asyncio.gather(*answers, return_exceptions=True)

    async def _send(self, message: Message) -> None:
        async with self._send_lock:
            await wire.write_message(self._writer, message)

    async def _read_loop(self) -> None:
        reason = "peer closed the connection"
        try:
            while True:
                message = await wire.read_message(self._reader)
                if isinstance(message, (Ack, ErrorReply, Granted)):
                    self._resolve(message)
                elif isinstance(message, CALL_TYPES):
                    reply = self._handle(message)
                    if isinstance(reply, (Ack, ErrorReply)):
                        await self._send(reply)
                    else:
                        self._answer_later(message, reply)
                else:
                    raise ProtocolError(f"unexpected {message.TAG} after the handshake", peer=self.peer_id)
        except (ConnectionLostError, ProtocolError) as exc:
            reason = str(exc)
            if isinstance(exc, ProtocolError):
                self._counters.inc("control_protocol_errors")
                log.warning("control connection broken", peer=self.peer_id, reason=reason)
        except asyncio.CancelledError:
            reason = self._closed_reason or "closed locally"
        self._mark_closed(reason)
        self._writer.close()
        if self._on_disconnect is not None:
            self._on_disconnect(self, self._closed_reason or reason)

    def _handle(self, message: CallMessage) -> Ack | ErrorReply | Awaitable[Granted | None]:
        try:
            pending = self._handler(self, message)
        except Exception as exc:
            return self._refusal(message, exc)
        return Ack(message.call_id) if pending is None else pending

    def _answer_later(self, message: CallMessage, pending: Awaitable[Granted | None]) -> None:
        async def answer() -> None:
            reply: Ack | ErrorReply | Granted
            try:
                granted = await pending
                reply = (
                    Ack(message.call_id)
                    if granted is None
                    else Granted(message.call_id, granted.dst_block_ids)
                )
            except Exception as exc:
                reply = self._refusal(message, exc)
            with contextlib.suppress(ConnectionLostError, OSError):
                await self._send(reply)

        task = asyncio.get_running_loop().create_task(answer(), name=f"control-answer-{message.req_id}")
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    def _refusal(self, message: CallMessage, exc: Exception) -> ErrorReply:
        if isinstance(exc, SplitwiseError):
            self._counters.inc("control_calls_refused")
            log.warning(
                "control call refused",
                peer=self.peer_id,
                req_id=message.req_id,
                tag=message.TAG,
                reason=str(exc),
            )
            return ErrorReply(message.call_id, str(exc), exc.retryable)
        # A handler bug must reach the caller, not kill the connection (called inside ``except``).
        self._counters.inc("control_handler_errors")
        log.exception("control handler failed", peer=self.peer_id, req_id=message.req_id, tag=message.TAG)
        return ErrorReply(message.call_id, f"internal error: {type(exc).__name__}: {exc}", False)

    def _resolve(self, reply: Ack | ErrorReply | Granted) -> None:
        future = self._pending.get(reply.call_id)
        if future is None or future.done():
            self._counters.inc("control_late_replies")
            log.info("reply for an unknown or timed-out call", peer=self.peer_id, call_id=reply.call_id)
            return
        future.set_result(reply)

    def _mark_closed(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        for future in self._pending.values():
            if not future.done():
                future.set_result(None)  # waiters see no reply and raise ConnectionLostError
