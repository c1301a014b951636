"""Every message the rdma transport puts on its TCP side channel, and their one encoding.

Frame: 4-byte big-endian length, then a msgpack map ``{"v": SCHEMA_VERSION, "t": tag, ...fields}``.
Decoding checks version, tag, the exact field set and every field's type (nested lanes included),
so a peer of another schema version is an InvalidConnectionInfoError, never a half-built message.

    P -> D  Hello(initiator_id, geometry, lanes=[QpEndpoint])          once per connection
    D -> P  HelloReply(ok, reason, geometry, lanes=[TargetLane])       D's QPs are in RTS when sent
    D -> P  RequestResult(req_id, ok, reason)                          after all lanes' notices

The data itself never crosses this channel: P WRITEs into D's KV memory and ends each request on
every lane with a WRITE_WITH_IMM whose immediate is ``request_tag(req_id)``.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import typing
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from rdma.errors import InvalidConnectionInfoError

SCHEMA_VERSION = 1
MAX_FRAME_BYTES = 1 << 20
_LENGTH = struct.Struct(">I")


def request_tag(req_id: str) -> int:
    """The 32-bit immediate that names a request on the wire (CRC-32 of its id)."""
    return zlib.crc32(req_id.encode()) & 0xFFFFFFFF


@dataclass(frozen=True)
class QpEndpoint:
    """What a peer needs to address one of our QPs (the RC handshake)."""

    device: str
    port_num: int
    link_layer: str  # "InfiniBand" | "Ethernet"
    lid: int
    gid: str
    qpn: int
    psn: int
    mtu_bytes: int


@dataclass(frozen=True)
class TargetLane:
    """One of D's QPs plus the memory P may write through it (addresses in D's MR space)."""

    qp: QpEndpoint
    kv_addr: int
    kv_length: int
    kv_rkey: int
    doorbell_addr: int
    doorbell_rkey: int


@dataclass(frozen=True)
class Message:
    TAG: ClassVar[str] = ""


@dataclass(frozen=True)
class Hello(Message):
    TAG: ClassVar[str] = "rdma_hello"
    initiator_id: str
    geometry: dict[str, Any]
    lanes: list[QpEndpoint]


@dataclass(frozen=True)
class HelloReply(Message):
    TAG: ClassVar[str] = "rdma_hello_reply"
    ok: bool
    reason: str
    geometry: dict[str, Any]
    lanes: list[TargetLane]


@dataclass(frozen=True)
class RequestResult(Message):
    TAG: ClassVar[str] = "rdma_request_result"
    req_id: str
    ok: bool
    reason: str


_TYPES: dict[str, type[Message]] = {cls.TAG: cls for cls in (Hello, HelloReply, RequestResult)}


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(data, dict) or set(data) != set(names):
        raise InvalidConnectionInfoError(f"{where}: expected fields {sorted(names)}, got {data!r:.200}")
    return cls(**{name: _convert(data[name], hints[name], f"{where}.{name}") for name in names})


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise InvalidConnectionInfoError(f"{where}: expected a list")
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise InvalidConnectionInfoError(f"{where}: expected a map")
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidConnectionInfoError(f"{where}: expected int, got {type(value).__name__}")
    if hint in (str, bool) and not isinstance(value, hint):
        raise InvalidConnectionInfoError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
    return value


def encode(message: Message) -> bytes:
    body = {"v": SCHEMA_VERSION, "t": message.TAG, **_to_plain(message)}
    return msgpack.packb(body, use_bin_type=True)


def decode(data: bytes) -> Message:
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise InvalidConnectionInfoError(f"not a msgpack message: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidConnectionInfoError("message is not a map")
    version, tag = body.pop("v", None), body.pop("t", None)
    if version != SCHEMA_VERSION:
        raise InvalidConnectionInfoError(f"schema version {version!r}, this side speaks {SCHEMA_VERSION}")
    cls = _TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise InvalidConnectionInfoError(f"unknown message type {tag!r}")
    return typing.cast(Message, _build(cls, body, cls.__name__))


def send_message(sock: socket.socket, message: Message) -> None:
    body = encode(message)
    sock.sendall(_LENGTH.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, num_bytes: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < num_bytes:
        chunk = sock.recv(num_bytes - len(chunks))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        chunks += chunk
    return bytes(chunks)


def recv_message(sock: socket.socket) -> Message:
    """Raises ConnectionError (closed), OSError (socket), InvalidConnectionInfoError (bad frame)."""
    (length,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size))
    if not 0 < length <= MAX_FRAME_BYTES:
        raise InvalidConnectionInfoError(f"frame of {length} bytes")
    return decode(_recv_exact(sock, length))
