"""Every message the transfer package puts on a wire, and their one encoding.

Encoding (``splitwise.wire_codec``): a msgpack map ``{"v": SCHEMA_VERSION, "t": <type tag>, <field>:
<value>, ...}``. Decoding checks the version, the tag, the exact field set and each field's type,
so garbage or a peer of another schema version is a ProtocolError, never a half-built message. Frames are length-prefixed
(see ``wire``); a LayerWrite header is followed by ``payload_bytes`` raw KV bytes.

Data plane (P = initiator, D = target), one TCP connection per (P, D) pair::

    P -> D  XferHello(initiator_id, geometry, access_key)   first frame
    D -> P  XferHelloReply(ok, reason, geometry)     refuses a wrong key or geometry, then closes
    P -> D  LayerWrite(req_id, layer, runs, payload_bytes) + payload    tcp only
    P -> D  RequestBegin(req_id)                     ipc only: before the first copy of a request
    D -> P  RequestGrant(req_id, ok, reason, dst_block_ids)   ipc only: the blocks P may write
    P -> D  RequestAbort(req_id, reason)             P failed the request locally
    P -> D  RequestFinish(req_id, num_block_writes)  after the request's last write
    D -> P  RequestResult(req_id, ok, reason)        D's verdict: landed, or why not

Control channel (``--pd-comm-port``; either side may call, replies carry the caller's call_id)::

    S -> C  AuthChallenge(server_id, nonce)
    C -> S  AuthHello(client_id, nonce, mac, compat)     mac proves C knows the cluster token
    S -> C  AuthWelcome(server_id, mac, compat) | Refused(code, reason)   mac proves S knows it too
    any     PrefillTask / PrefillResult / CancelRequest / PrefillFailed  (each with call_id)
    any     Ack(call_id) | ErrorReply(call_id, reason, retryable)

Live migration D1 -> D2 (D1 calls over the connection it opened to D2; docs/architecture.md)::

    D1 -> D2  MigrateOffer(req_id, num_tokens, protocol)   D2 reserves, its target expects
    D2 -> D1  Granted(call_id, dst_block_ids)               (the reply: which blocks to write)
    D1 -> D2  MigrateCommit(req_id, work_item, tokens, params, ...)  every write landed: D2 admits
    D1 -> D2  MigrateAbort(req_id, reason)                  D1 can no longer write: D2 releases
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from splitwise.codes import Protocol, RefusalCode
from splitwise.engine.sampling_params import SamplingParams
from splitwise.kv_geometry import KVGeometry
from splitwise.transfer.base import Endpoint
from splitwise.transfer.errors import ProtocolError
from splitwise.wire_codec import MessageCodec

# 2: typed SamplingParams, Compatibility, KVGeometry and Endpoint (were maps); 3: enums (were strings);
# 4: live migration (MigrateOffer / Granted / MigrateCommit / MigrateAbort)
SCHEMA_VERSION = 4


@dataclass(frozen=True)
class Message:
    TAG: ClassVar[str] = ""


@dataclass(frozen=True)
class PerRequest(Message):
    """A data-plane message about one request (its id goes first on the wire)."""

    req_id: str


@dataclass(frozen=True)
class Numbered(Message):
    """A control-channel message: ``call_id`` numbers a call, and a reply carries its call's."""

    call_id: int


@dataclass(frozen=True)
class Call(Numbered):
    """A control-channel call about one request (answered by an Ack or ErrorReply)."""

    req_id: str


# --------------------------------------------------------------------------- data plane


@dataclass(frozen=True)
class XferHello(Message):
    """``access_key`` is the one from the target's endpoint: only a peer that was handed the
    endpoint (over the authenticated control channel, or from the cluster registry) may write."""

    TAG: ClassVar[str] = "xfer_hello"
    initiator_id: str
    geometry: KVGeometry
    access_key: str


@dataclass(frozen=True)
class XferHelloReply(Message):
    TAG: ClassVar[str] = "xfer_hello_reply"
    ok: bool
    reason: str
    geometry: KVGeometry


@dataclass(frozen=True)
class LayerWrite(PerRequest):
    """Header of one layer's blocks for one request. ``runs`` = [[dst_start, num_blocks], ...];
    the payload is K of every run in order, then V of every run in order."""

    TAG: ClassVar[str] = "layer_write"
    layer: int
    runs: list[list[int]]
    payload_bytes: int


@dataclass(frozen=True)
class RequestBegin(PerRequest):
    TAG: ClassVar[str] = "request_begin"


@dataclass(frozen=True)
class RequestGrant(PerRequest):
    """D -> P answer to RequestBegin: the blocks P may write for the request (ipc checks before
    every copy), or ``ok=False`` with the reason when D does not expect the request."""

    TAG: ClassVar[str] = "request_grant"
    ok: bool
    reason: str
    dst_block_ids: list[int]


@dataclass(frozen=True)
class RequestAbort(PerRequest):
    """P -> D: P gave up on the request (a local copy or validation failed); D fails it now."""

    TAG: ClassVar[str] = "request_abort"
    reason: str


@dataclass(frozen=True)
class RequestFinish(PerRequest):
    """``num_block_writes`` = sum over write_layer calls of their block count (K and V as one)."""

    TAG: ClassVar[str] = "request_finish"
    num_block_writes: int


@dataclass(frozen=True)
class RequestResult(PerRequest):
    TAG: ClassVar[str] = "request_result"
    ok: bool
    reason: str


# --------------------------------------------------------------------------- control channel


@dataclass(frozen=True)
class Compatibility:
    """What two nodes must agree on to exchange KV blocks (checked both ways at the handshake)."""

    model_id: str
    kv: KVGeometry

    def mismatches(self, other: Compatibility) -> list[str]:
        model = (
            []
            if self.model_id == other.model_id
            else [f"model_id: ours {self.model_id!r}, peer {other.model_id!r}"]
        )
        return model + self.kv.mismatches(other.kv)


@dataclass(frozen=True)
class AuthChallenge(Message):
    TAG: ClassVar[str] = "auth_challenge"
    server_id: str
    nonce: bytes


@dataclass(frozen=True)
class AuthHello(Message):
    TAG: ClassVar[str] = "auth_hello"
    client_id: str
    nonce: bytes
    mac: bytes
    compat: Compatibility


@dataclass(frozen=True)
class AuthWelcome(Message):
    TAG: ClassVar[str] = "auth_welcome"
    server_id: str
    mac: bytes
    compat: Compatibility


@dataclass(frozen=True)
class Refused(Message):
    """Server -> client before closing, saying why."""

    TAG: ClassVar[str] = "refused"
    code: RefusalCode
    reason: str


@dataclass(frozen=True)
class PrefillTask(Call):
    """D -> P: prefill ``prompt_token_ids`` and ship the KV of its blocks ``skip_blocks`` .. into
    ``dst_block_ids`` on D.
    ``sampling_params`` travels as the engine's own dataclass (a map of its fields): a field added
    there reaches P with no converter to edit; its validation runs again on decode."""

    TAG: ClassVar[str] = "prefill_task"
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    dst_block_ids: list[int]
    protocol: Protocol
    endpoint: Endpoint
    # Decode-side reuse: D holds the prompt's first ``skip_blocks`` blocks in its prefix cache, so
    # ``dst_block_ids`` are D's blocks for prompt blocks skip_blocks.. and P ships only those.
    skip_blocks: int = 0


@dataclass(frozen=True)
class PrefillResult(Call):
    """P -> D: the KV transfer completed and this is the first generated token."""

    TAG: ClassVar[str] = "prefill_result"
    first_token_id: int
    logprob: float
    # The first position's top_logprobs alternatives (SamplingParams.top_logprobs of them), most likely first.
    top_token_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    # echo + logprobs: per prompt token after the first, its logprob and top alternatives.
    prompt_logprobs: list[float] | None = None
    prompt_top_token_ids: list[list[int]] | None = None
    prompt_top_logprobs: list[list[float]] | None = None


@dataclass(frozen=True)
class PrefillFailed(Call):
    TAG: ClassVar[str] = "prefill_failed"
    reason: str
    retryable: bool


@dataclass(frozen=True)
class CancelRequest(Call):
    TAG: ClassVar[str] = "cancel_request"
    reason: str


@dataclass(frozen=True)
class MigrateOffer(Call):
    """D1 -> D2: take over running request ``req_id``; reserve KV for ``num_tokens`` tokens and
    expect D1's writes over ``protocol`` under ``transfer_ids`` (one per copy round).
    Answered by ``Granted`` (or an ErrorReply: refused)."""

    TAG: ClassVar[str] = "migrate_offer"
    num_tokens: int
    protocol: Protocol
    transfer_ids: list[str]


@dataclass(frozen=True)
class MigrateCommit(Call):
    """D1 -> D2 once every write landed and the request is paused on D1: admit it and own it.
    ``work_item`` is the scheduler's WorkItem (its own typed codec, scheduler.messages);
    ``next_index`` is the completion index of the next token (what the client has so far)."""

    TAG: ClassVar[str] = "migrate_commit"
    work_item: bytes
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    num_computed_tokens: int
    next_index: int
    transfer_ids: list[str]  # the copy rounds (transport request keys) D2 must see DONE


@dataclass(frozen=True)
class MigrateAbort(Call):
    """D1 -> D2: the migration is off and none of D1's writes can land any more: release."""

    TAG: ClassVar[str] = "migrate_abort"
    reason: str


@dataclass(frozen=True)
class Granted(Numbered):
    """The reply to a MigrateOffer: the reserved blocks D1 writes (in block-table order)."""

    TAG: ClassVar[str] = "granted"
    dst_block_ids: list[int]


@dataclass(frozen=True)
class Ack(Numbered):
    TAG: ClassVar[str] = "ack"


@dataclass(frozen=True)
class ErrorReply(Numbered):
    TAG: ClassVar[str] = "error_reply"
    reason: str
    retryable: bool


CallMessage = (
    PrefillTask | PrefillResult | PrefillFailed | CancelRequest | MigrateOffer | MigrateCommit | MigrateAbort
)
CALL_TYPES = (
    PrefillTask,
    PrefillResult,
    PrefillFailed,
    CancelRequest,
    MigrateOffer,
    MigrateCommit,
    MigrateAbort,
)
ReplyMessage = Ack | ErrorReply | Granted

CODEC = MessageCodec(
    (
        XferHello,
        XferHelloReply,
        LayerWrite,
        RequestBegin,
        RequestGrant,
        RequestAbort,
        RequestFinish,
        RequestResult,
        AuthChallenge,
        AuthHello,
        AuthWelcome,
        Refused,
        PrefillTask,
        PrefillResult,
        PrefillFailed,
        CancelRequest,
        MigrateOffer,
        MigrateCommit,
        MigrateAbort,
        Granted,
        Ack,
        ErrorReply,
    ),
    schema_version=SCHEMA_VERSION,
    error=ProtocolError,
)


def encode(message: Message) -> bytes:
    return CODEC.encode(message)


def decode(data: bytes) -> Message:
    """Parse one message; raises ProtocolError on anything but a well-formed known message."""
    return typing.cast(Message, CODEC.decode(data))


def expect_type(message: Message, cls: type[Message]) -> Any:
    """Return ``message`` if it is a ``cls``; ProtocolError otherwise (an out-of-order frame)."""
    if not isinstance(message, cls):
        raise ProtocolError(f"expected {cls.TAG}, got {message.TAG}")
    return message
