"""Every message the rdma transport puts on its TCP side channel, and their one encoding.

Frame (``splitwise.framing``): 4-byte big-endian length, then a msgpack map
``{"v": SCHEMA_VERSION, "t": tag, ...fields}`` (``splitwise.wire_codec``). Decoding checks version,
tag, the exact field set and every field's type (nested lanes included), so a peer of another
schema version is an InvalidConnectionInfoError, never a half-built message.

    (the cluster-token challenge of splitwise.transfer.auth first: nothing below before it)
    P -> D  Hello(initiator_id, geometry, lanes=[QpEndpoint])          once per connection
    D -> P  HelloReply(ok, reason, geometry, lanes=[TargetLane])       D's QPs are in RTS when sent
    P -> D  RequestBegin(req_id)                                       before P's first WRITE of it
    D -> P  RequestGrant(req_id, ok, reason, dst_block_ids)            binds it to this initiator
    D -> P  RequestResult(req_id, ok, reason)                          after all lanes' notices

The grant is the fence against a request D no longer expects: P posts nothing for a request until
D granted it, and D grants only requests it expects (never a forgotten one).

The data itself never crosses this channel: P WRITEs into D's KV memory and ends each request on
every lane with a WRITE_WITH_IMM whose immediate is ``request_tag(req_id)``.
"""

from __future__ import annotations

import socket
import typing
import zlib
from dataclasses import dataclass
from typing import ClassVar

from rdma.errors import InvalidConnectionInfoError
from rdma.verbs import LinkLayer
from splitwise.framing import pack_frame, recv_frame
from splitwise.kv_geometry import KVGeometry

# The per-request messages are the transfer package's own (same fields, same meaning, one class).
from splitwise.transfer.messages import Message as Message
from splitwise.transfer.messages import RequestBegin as RequestBegin
from splitwise.transfer.messages import RequestGrant as RequestGrant
from splitwise.transfer.messages import RequestResult as RequestResult
from splitwise.wire_codec import MessageCodec

# 2: authenticated side channel, RequestBegin/RequestGrant; 3: typed KVGeometry, the transfer
# package's RequestBegin/RequestGrant/RequestResult (tags "request_*", were "rdma_request_*"), LinkLayer
SCHEMA_VERSION = 3
MAX_FRAME_BYTES = 1 << 20


def request_tag(req_id: str) -> int:
    """The 32-bit immediate that names a request on the wire (CRC-32 of its id)."""
    return zlib.crc32(req_id.encode()) & 0xFFFFFFFF


@dataclass(frozen=True)
class QpEndpoint:
    """What a peer needs to address one of our QPs (the RC handshake)."""

    device: str
    port_num: int
    link_layer: LinkLayer  # its value on the wire: "InfiniBand" | "Ethernet"
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
class Hello(Message):
    TAG: ClassVar[str] = "rdma_hello"
    initiator_id: str
    geometry: KVGeometry
    lanes: list[QpEndpoint]


@dataclass(frozen=True)
class HelloReply(Message):
    TAG: ClassVar[str] = "rdma_hello_reply"
    ok: bool
    reason: str
    geometry: KVGeometry
    lanes: list[TargetLane]


CODEC = MessageCodec(
    (Hello, HelloReply, RequestBegin, RequestGrant, RequestResult),
    schema_version=SCHEMA_VERSION,
    error=InvalidConnectionInfoError,
)


def encode(message: Message) -> bytes:
    return CODEC.encode(message)


def decode(data: bytes) -> Message:
    return typing.cast(Message, CODEC.decode(data))


def send_message(sock: socket.socket, message: Message) -> None:
    sock.sendall(pack_frame(encode(message)))


def recv_message(sock: socket.socket) -> Message:
    """Raises ConnectionError (closed), OSError (socket), InvalidConnectionInfoError (bad frame)."""
    return decode(recv_frame(sock, max_bytes=MAX_FRAME_BYTES, error=InvalidConnectionInfoError))
