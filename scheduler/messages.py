"""Every message that crosses a process boundary through Redis, and its one encoder/decoder.

Wire format: msgpack map ``{"v": SCHEMA_VERSION, "t": <type tag>, "f": {field: value}}``.
Decoding checks the version, the tag, the exact field set and each field's type, and raises
``MessageDecodeError`` (with the reason) for anything else: callers send such payloads to the
dead-letter stream. No pickle: a payload can only ever become one of the classes below.

Token positions: ``TokenChunk.index`` is the position of ``token_ids[0]`` in the completion
(0-based over the whole generation, resume tokens included), which is what lets the frontend
drop duplicates after a re-dispatch.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import msgpack

from scheduler.errors import MessageDecodeError

SCHEMA_VERSION = 1
ROLES = ("mixed", "prefill", "decode")
PROTOCOLS = ("ipc", "rdma", "tcp")


@dataclass(frozen=True)
class KVGeometry:
    """Nodes pair only when model id and this geometry are equal (KV blocks must be byte-compatible)."""

    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class NodeInfo:
    TYPE: ClassVar[str] = "node"
    node_id: str
    role: str
    host: str
    http_port: int
    pd_comm_port: int
    model_id: str
    kv: KVGeometry
    # Preference order (the node's --cache-transfer-protocol); endpoints: protocol -> endpoint info.
    transfer_protocols: list[str] = field(default_factory=lambda: ["tcp"])
    transfer_endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Set by NodeAgent.start: a fresh id per process start, so a restarted node is a new node.
    incarnation: str = ""
    started_ms: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"--splitwise-role: {self.role!r} is not one of {list(ROLES)}")
        unknown = [p for p in self.transfer_protocols if p not in PROTOCOLS]
        if unknown:
            raise ValueError(f"--cache-transfer-protocol: unknown {unknown}, expected some of {list(PROTOCOLS)}")

    @property
    def compat_key(self) -> tuple[str, KVGeometry]:
        return (self.model_id, self.kv)


@dataclass(frozen=True)
class LoadReport:
    """What a node says about itself each heartbeat. Stored as plain hash fields (readable in redis-cli)."""

    queued_prefill_tokens: int = 0
    running_requests: int = 0
    free_kv_blocks: int = 0
    waiting_requests: int = 0

    def to_fields(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> LoadReport:
        return cls(**{name: int(fields.get(name, 0) or 0) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Assignment:
    """Where a request runs. ``mixed``: one node does everything. ``disagg``: the work item goes to the
    DECODE node, which reserves KV blocks and then drives the prefill node over its pd-comm channel."""

    mode: str  # "mixed" | "disagg"
    prefill_node_id: str
    decode_node_id: str
    protocol: str | None = None
    prefill_endpoint: dict[str, Any] = field(default_factory=dict)
    decode_endpoint: dict[str, Any] = field(default_factory=dict)
    prefill_host: str = ""
    prefill_pd_comm_port: int = 0
    prefill_incarnation: str = ""
    decode_incarnation: str = ""

    @property
    def node_ids(self) -> tuple[str, ...]:
        return (self.decode_node_id,) if self.mode == "mixed" else (self.prefill_node_id, self.decode_node_id)


@dataclass(frozen=True)
class WorkItem:
    TYPE: ClassVar[str] = "work"
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: dict[str, Any]
    frontend_id: str
    created_ms: int
    deadline_ms: int
    attempt: int
    # Tokens the client already has: a re-dispatched request continues after them.
    resume_token_ids: list[int]
    assignment: Assignment


@dataclass(frozen=True)
class TokenChunk:
    TYPE: ClassVar[str] = "tokens"
    req_id: str
    attempt: int
    index: int
    token_ids: list[int]
    logprobs: list[float] | None = None
    is_terminal: ClassVar[bool] = False


@dataclass(frozen=True)
class Finished:
    TYPE: ClassVar[str] = "finished"
    req_id: str
    attempt: int
    finish_reason: str  # "stop" | "length" | ...
    prompt_tokens: int
    completion_tokens: int
    is_terminal: ClassVar[bool] = True


@dataclass(frozen=True)
class Failed:
    TYPE: ClassVar[str] = "error"
    req_id: str
    attempt: int
    code: str
    message: str
    retryable: bool = False
    is_terminal: ClassVar[bool] = True


@dataclass(frozen=True)
class Expired:
    TYPE: ClassVar[str] = "expired"
    req_id: str
    attempt: int
    is_terminal: ClassVar[bool] = True


@dataclass(frozen=True)
class Cancelled:
    TYPE: ClassVar[str] = "cancelled"
    req_id: str
    attempt: int
    is_terminal: ClassVar[bool] = True


@dataclass(frozen=True)
class CancelMessage:
    """Frontend -> node control stream: drop this request (client gone, expired or re-dispatched)."""

    TYPE: ClassVar[str] = "cancel"
    req_id: str
    attempt: int
    reason: str


ResultMessage = TokenChunk | Finished | Failed | Expired | Cancelled
Message = NodeInfo | WorkItem | TokenChunk | Finished | Failed | Expired | Cancelled | CancelMessage
_BY_TAG: dict[str, type] = {
    cls.TYPE: cls for cls in (NodeInfo, WorkItem, TokenChunk, Finished, Failed, Expired, Cancelled, CancelMessage)
}
RESULT_TYPES = (TokenChunk, Finished, Failed, Expired, Cancelled)


@dataclass(frozen=True)
class SubmitRequest:
    """What the HTTP layer hands ``FrontendScheduler.submit`` (in-process only, never on the wire)."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: dict[str, Any] = field(default_factory=dict)
    model_id: str | None = None  # None: the frontend's own model
    ttl_s: float | None = None  # None: --scheduler-ttl


def encode(msg: Message) -> bytes:
    body = {"v": SCHEMA_VERSION, "t": msg.TYPE, "f": dataclasses.asdict(msg)}
    return msgpack.packb(body, use_bin_type=True)


def decode(payload: bytes, expect: type | tuple[type, ...] | None = None) -> Any:
    """Decode one payload; ``expect`` restricts the accepted classes. Raises MessageDecodeError."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise MessageDecodeError(f"not msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(body, dict) or set(body) != {"v", "t", "f"}:
        raise MessageDecodeError("not a message envelope {v, t, f}")
    if body["v"] != SCHEMA_VERSION:
        raise MessageDecodeError(f"unsupported schema version {body['v']!r} (this build speaks {SCHEMA_VERSION})")
    cls = _BY_TAG.get(body["t"]) if isinstance(body["t"], str) else None
    if cls is None:
        raise MessageDecodeError(f"unknown message type {body['t']!r}")
    if expect is not None and not issubclass(cls, expect):
        raise MessageDecodeError(f"unexpected message type {body['t']!r} here")
    try:
        return _build(cls, body["f"], body["t"])
    except MessageDecodeError:
        raise
    except (TypeError, ValueError) as exc:
        raise MessageDecodeError(f"invalid {body['t']!r}: {exc}") from None


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise MessageDecodeError(f"{where}: fields must be a map")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if set(data) - names:
        raise MessageDecodeError(f"{where}: unknown fields {sorted(set(data) - names)}")
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if required - set(data):
        raise MessageDecodeError(f"{where}: missing fields {sorted(required - set(data))}")
    values = {name: _check(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    return cls(**values)


def _check(hint: Any, value: Any, where: str) -> Any:
    """Check ``value`` against a type hint (the small subset our messages use); build nested dataclasses."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _check(option, value, where)
            except MessageDecodeError as exc:
                errors.append(str(exc))
        raise MessageDecodeError(f"{where}: {type(value).__name__} matches no option of {hint}")
    if hint is type(None):
        if value is not None:
            raise MessageDecodeError(f"{where}: expected nil")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)  # type: ignore[arg-type]
    if origin is list:
        if not isinstance(value, list):
            raise MessageDecodeError(f"{where}: expected array, got {type(value).__name__}")
        (item,) = typing.get_args(hint)
        return [_check(item, v, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise MessageDecodeError(f"{where}: expected map, got {type(value).__name__}")
        key_t, val_t = typing.get_args(hint)
        return {_check(key_t, k, where): _check(val_t, v, where) for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MessageDecodeError(f"{where}: expected float, got {type(value).__name__}")
        return float(value)
    if hint is int and isinstance(value, bool):
        raise MessageDecodeError(f"{where}: expected int, got bool")
    if hint in (int, str, bool, bytes):
        if not isinstance(value, hint):
            raise MessageDecodeError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        return value
    raise MessageDecodeError(f"{where}: unsupported hint {hint}")  # a bug in this module, not in the payload
