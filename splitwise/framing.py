"""Length-prefixed frames over a blocking stream socket: the one framing of transfer and rdma.

Frame layout::

    offset  size  content
    0       4     n = body length, big-endian uint32 (1 .. max_bytes)
    4       n     body (one encoded message, see ``splitwise.wire_codec``)

Callers keep their own error vocabulary: ``recv_frame`` takes the exception for a bad length and
the function that fills a buffer (which decides what EOF, a timeout or a socket error raise);
``read_frame`` is the same frame read from an asyncio stream (the control channel), which raises
``asyncio.IncompleteReadError`` / ``ConnectionError`` as they come.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

LENGTH = struct.Struct(">I")
ReadExact = Callable[[socket.socket, memoryview], None]


def pack_frame(body: bytes) -> bytes:
    return LENGTH.pack(len(body)) + body


def read_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; ConnectionError on EOF, socket errors (OSError) as they come."""
    view = view.cast("B")
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"peer closed the connection ({got}/{len(view)} bytes of a read)")
        got += n


def recv_frame(
    sock: socket.socket, *, max_bytes: int, error: type[Exception], fill: ReadExact = read_exact
) -> bytes:
    """Read one frame's body. ``error`` on a length outside 1..max_bytes (garbage or another protocol)."""
    prefix = bytearray(LENGTH.size)
    fill(sock, memoryview(prefix))
    (length,) = LENGTH.unpack(prefix)
    if not 0 < length <= max_bytes:
        raise error(f"frame length {length} outside 1..{max_bytes}")
    body = bytearray(length)
    fill(sock, memoryview(body))
    return bytes(body)


async def read_frame(reader: asyncio.StreamReader, *, max_bytes: int, error: type[Exception]) -> bytes:
    """``recv_frame`` on an asyncio stream."""
    (length,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
    if not 0 < length <= max_bytes:
        raise error(f"frame length {length} outside 1..{max_bytes}")
    return await reader.readexactly(length)
