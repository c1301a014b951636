"""Length-prefixed frames (``splitwise.framing``) over a blocking TCP socket, and zero-copy payload
send/receive.

Frame layout::

    offset  size        content
    0       4           n = header length, big-endian uint32 (1 .. MAX_HEADER_BYTES)
    4       n           msgpack header (``messages.encode``)
    4 + n   payload     raw bytes, only for LayerWrite (its ``payload_bytes``)

Payloads go out with ``sendmsg`` over memoryviews of the KV buffer and come in with ``recv_into``
memoryviews of the destination blocks: no copy through Python bytes on either side.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Sequence

from splitwise.framing import pack_frame, read_frame, recv_frame
from splitwise.transfer.errors import ConnectionLostError, ProtocolError, TransferTimeoutError
from splitwise.transfer.messages import Message, decode, encode

MAX_HEADER_BYTES = 16 * 1024 * 1024  # a header lists runs, never KV bytes; larger means garbage
# Before authentication a peer may send only its hello (ids, nonce, mac, KV geometry: well under
# 1 KiB): a larger declared frame is refused before anything is allocated for it.
PRE_AUTH_MAX_BYTES = 16 * 1024
_IOV_MAX = 512  # below every platform's IOV_MAX (1024 on Linux)
# Bytes offered to one sendmsg/recvmsg_into call. Each call costs Python a buffer export per iovec,
# but moves only about a socket buffer's worth, so offering many more iovecs than that makes the
# cost per byte quadratic for small blocks (4 KiB blocks: 0.1 GB/s with 512 iovecs per call).
_WINDOW_BYTES = 512 * 1024


def frame_bytes(message: Message) -> bytes:
    return pack_frame(encode(message))


def send_message(sock: socket.socket, message: Message) -> None:
    try:
        sock.sendall(frame_bytes(message))
    except OSError as exc:
        raise ConnectionLostError(f"send failed: {exc}") from None


def send_buffers(sock: socket.socket, buffers: Sequence[memoryview | bytes]) -> None:
    """Send every buffer in order with as few syscalls as possible (sendmsg gathers up to _IOV_MAX)."""
    pending = [_bytes_view(b) for b in buffers if len(b)]
    first = 0
    try:
        while first < len(pending):
            first = _advance(pending, first, sock.sendmsg(_window(pending, first)))
    except OSError as exc:
        raise ConnectionLostError(f"send failed: {exc}") from None


def _bytes_view(buffer: memoryview | bytes) -> memoryview:
    view = memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _window(pending: list[memoryview], first: int) -> list[memoryview]:
    """pending[first:end], as few buffers as cover _WINDOW_BYTES (at least one, at most _IOV_MAX)."""
    end, size = first, 0
    limit = min(len(pending), first + _IOV_MAX)
    while end < limit and size < _WINDOW_BYTES:
        size += len(pending[end])
        end += 1
    return pending[first:end]


def _advance(pending: list[memoryview], first: int, done: int) -> int:
    """Consume ``done`` bytes from pending[first:]; returns the new first unfinished index."""
    while done:
        head = pending[first]
        if done >= len(head):
            done -= len(head)
            first += 1
        else:
            pending[first] = head[done:]
            done = 0
    return first


def recv_into_exact(sock: socket.socket, view: memoryview, *, deadline: float | None = None) -> None:
    """Fill ``view`` completely from ``sock``; ConnectionLostError on EOF or socket error,
    TransferTimeoutError when the socket times out. ``deadline`` (``time.monotonic``) bounds the
    whole read, not each recv: every recv gets only what is left of it."""
    view = view.cast("B")
    timed_out = "receive timed out" if deadline is None else "deadline passed"
    got = 0
    while got < len(view):
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransferTimeoutError(f"deadline passed ({got}/{len(view)} bytes of a read)")
            sock.settimeout(remaining)  # what is left of the deadline, however the bytes trickle in
        try:
            n = sock.recv_into(view[got:])
        except TimeoutError:
            raise TransferTimeoutError(f"{timed_out} ({got}/{len(view)} bytes of a read)") from None
        except OSError as exc:
            raise ConnectionLostError(f"receive failed: {exc}") from None
        if n == 0:
            raise ConnectionLostError(f"peer closed the connection ({got}/{len(view)} bytes of a read)")
        got += n


def recv_into_buffers(sock: socket.socket, views: Sequence[memoryview]) -> None:
    """Fill every view in order, scatter-reading with ``recvmsg_into`` (readv): one syscall covers
    many small destination runs, and the bytes still land straight in place."""
    pending = [_bytes_view(v) for v in views if len(v)]
    first = 0
    while first < len(pending):
        try:
            got = sock.recvmsg_into(_window(pending, first))[0]
        except TimeoutError:
            raise TransferTimeoutError("receive timed out in a payload") from None
        except OSError as exc:
            raise ConnectionLostError(f"receive failed: {exc}") from None
        if got == 0:
            raise ConnectionLostError("peer closed the connection in the middle of a payload")
        first = _advance(pending, first, got)


def recv_message(
    sock: socket.socket, *, max_bytes: int = MAX_HEADER_BYTES, deadline: float | None = None
) -> Message:
    """Read one framed message. ProtocolError on a bad length or a malformed header. ``deadline``
    (``time.monotonic``) bounds the whole read, not each recv: a peer dripping a byte at a time
    cannot hold the connection past it (TransferTimeoutError)."""
    fill = functools.partial(recv_into_exact, deadline=deadline)
    return decode(recv_frame(sock, max_bytes=max_bytes, error=ProtocolError, fill=fill))


async def read_message(reader: asyncio.StreamReader, *, max_bytes: int = MAX_HEADER_BYTES) -> Message:
    """``recv_message`` on an asyncio stream (the control channel). ConnectionLostError on EOF."""
    try:
        return decode(await read_frame(reader, max_bytes=max_bytes, error=ProtocolError))
    except asyncio.IncompleteReadError:
        raise ConnectionLostError("peer closed the connection") from None
    except OSError as exc:
        raise ConnectionLostError(f"receive failed: {exc}") from None


async def write_message(writer: asyncio.StreamWriter, message: Message) -> None:
    """Send one framed message on an asyncio stream. ConnectionLostError when the peer is gone."""
    try:
        writer.write(frame_bytes(message))
        await writer.drain()
    except OSError as exc:
        raise ConnectionLostError(f"send failed: {exc}") from None


async def open_connection(
    host: str, port: int, timeout_s: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``connect`` for asyncio streams (Nagle off)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, asyncio.TimeoutError) as exc:
        raise ConnectionLostError(
            f"cannot connect to {host}:{port}: {exc or 'timed out'}", peer=f"{host}:{port}"
        ) from None
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


def discard(sock: socket.socket, num_bytes: int, scratch_bytes: int = 1 << 20) -> None:
    """Read and drop ``num_bytes`` (the payload of a refused frame) to keep the stream in sync."""
    scratch = memoryview(bytearray(min(num_bytes, scratch_bytes) or 1))
    while num_bytes > 0:
        chunk = min(num_bytes, len(scratch))
        recv_into_exact(sock, scratch[:chunk])
        num_bytes -= chunk


def connect(host: str, port: int, timeout_s: float) -> socket.socket:
    """A connected blocking TCP socket with Nagle off (headers are small and latency matters)."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        raise ConnectionLostError(f"cannot connect to {host}:{port}: {exc}", peer=f"{host}:{port}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    return sock


def shutdown(sock: socket.socket) -> None:
    """Wake every thread blocked on ``sock`` (recv returns EOF); harmless if already closed."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected: nothing to wake
