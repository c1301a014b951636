"""Every message that crosses a process boundary through Redis, and its one encoder/decoder.

Wire format: msgpack map ``{"v": SCHEMA_VERSION, "t": <type tag>, "f": {field: value}}``, encoded
and decoded by ``splitwise.wire_codec``. Decoding checks the version, the tag, the exact field set
and each field's type, and raises ``MessageDecodeError`` (with the reason) for anything else:
callers send such payloads to the dead-letter stream. No pickle: a payload can only ever become
one of the classes below.

Token positions: ``TokenChunk.index`` is the position of ``token_ids[0]`` in the completion
(0-based over the whole generation, resume tokens included), which is what lets the frontend
drop duplicates after a re-dispatch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from scheduler.errors import MessageDecodeError
from splitwise.codes import FailureCode, Mode, Protocol, Role
from splitwise.endpoint import Endpoint
from splitwise.engine.sampling_params import SamplingParams
from splitwise.kv_geometry import KVGeometry as KVGeometry  # re-exported; nodes pair on kv.compat_key
from splitwise.wire_codec import MessageCodec

# 3: typed SamplingParams, Endpoint per protocol, and Role/Mode/Protocol/FailureCode (were maps, strings)
# 4: node commands on the control stream (DrainRequest, RoleChangeRequest), FailureCode.NODE_DRAINING
SCHEMA_VERSION = 4


@dataclass(frozen=True)
class NodeInfo:
    TYPE: ClassVar[str] = "node"
    node_id: str
    role: Role
    host: str  # the address peers connect to (--advertise-host), never a wildcard
    http_port: int
    pd_comm_port: int
    model_id: str
    kv: KVGeometry
    # Preference order (the node's --cache-transfer-protocol); a decode node's targets' endpoints.
    transfer_protocols: list[Protocol] = field(default_factory=lambda: [Protocol.TCP])
    transfer_endpoints: dict[Protocol, Endpoint] = field(default_factory=dict)
    # Same-host detection (ipc) compares this, never ``host``: boot id + IPC namespace
    # (splitwise/instance/host_identity.py); empty: unknown, never the same host as anyone.
    host_id: str = ""
    # Set by NodeAgent.start: a fresh id per process start, so a restarted node is a new node.
    incarnation: str = ""
    started_ms: int = 0

    def __post_init__(self) -> None:
        # Typed fields; a caller's plain string becomes the member (or a ValueError naming the flag).
        _set_enum(self, "role", Role, "--splitwise-role")
        try:
            protocols = [Protocol(p) for p in self.transfer_protocols]
        except ValueError:
            raise ValueError(
                f"--cache-transfer-protocol: unknown in {list(self.transfer_protocols)},"
                f" expected some of {[p.value for p in Protocol]}"
            ) from None
        object.__setattr__(self, "transfer_protocols", protocols)

    @property
    def compat_key(self) -> tuple[str, tuple[str, int, int, int, int]]:
        return (self.model_id, self.kv.compat_key)


@dataclass(frozen=True)
class LoadReport:
    """What a node says about itself each heartbeat. Stored as plain hash fields (readable in redis-cli)."""

    queued_prefill_tokens: int = 0
    running_requests: int = 0
    free_kv_blocks: int = 0
    waiting_requests: int = 0
    # #16, the planner's SLO signals: rolling p90 over the last 30 s of the requests this node
    # streamed (splitwise/planner/latency.py), and how many first tokens that window holds.
    ttft_p90_ms: int = 0
    itl_p90_ms: int = 0
    latency_samples: int = 0

    def to_fields(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> LoadReport:
        return cls(**{name: int(fields.get(name, 0) or 0) for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Assignment:
    """Where a request runs. ``mixed``: one node does everything. ``disagg``: the work item goes to the
    DECODE node, which reserves KV blocks and then drives the prefill node over its pd-comm channel."""

    mode: Mode
    prefill_node_id: str
    decode_node_id: str
    protocol: Protocol | None = None
    # disagg: each node's transport endpoint of ``protocol`` from its NodeInfo (None: it has none)
    prefill_endpoint: Endpoint | None = None
    decode_endpoint: Endpoint | None = None
    prefill_host: str = ""
    prefill_pd_comm_port: int = 0
    prefill_incarnation: str = ""
    decode_incarnation: str = ""
    # The compatibility group it was booked in and the booking members (scheduler.scripts): whoever
    # ends the request releases exactly these.
    group: str = ""
    bookings: list[str] = field(default_factory=list)

    @property
    def node_ids(self) -> tuple[str, ...]:
        return (
            (self.decode_node_id,) if self.mode == Mode.MIXED else (self.prefill_node_id, self.decode_node_id)
        )

    def booking(self, kind: str) -> str | None:
        """The booking member of ``kind`` ('p' prompt tokens on P, 'd' decode slot, 'm' mixed)."""
        return next((b for b in self.bookings if b.startswith(kind + "|")), None)


@dataclass(frozen=True)
class WorkItem:
    TYPE: ClassVar[str] = "work"
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    frontend_id: str
    created_ms: int
    deadline_ms: int
    attempt: int
    # Tokens the client already has: a re-dispatched request continues after them.
    resume_token_ids: list[int]
    assignment: Assignment


@dataclass(frozen=True)
class _PerAttempt:
    """The fields every per-request message starts with (first on the wire too): which request,
    and which attempt of it (a re-dispatch is a new attempt; older attempts' messages are stale)."""

    req_id: str
    attempt: int
    is_terminal: ClassVar[bool] = False


@dataclass(frozen=True)
class _Terminal(_PerAttempt):
    """A result that ends its attempt's stream: nothing of that attempt follows it."""

    is_terminal: ClassVar[bool] = True


@dataclass(frozen=True)
class TokenChunk(_PerAttempt):
    TYPE: ClassVar[str] = "tokens"
    index: int
    token_ids: list[int]
    logprobs: list[float] | None = None
    # Per token: the request's top_logprobs alternatives (ids and logprobs, most likely first).
    top_token_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
    # echo + logprobs: per prompt token after the first, its logprob and top alternatives.
    prompt_logprobs: list[float] | None = None
    prompt_top_token_ids: list[list[int]] | None = None
    prompt_top_logprobs: list[list[float]] | None = None


@dataclass(frozen=True)
class Finished(_Terminal):
    TYPE: ClassVar[str] = "finished"
    finish_reason: str  # "stop" | "length" | ...
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed(_Terminal):
    TYPE: ClassVar[str] = "error"
    code: FailureCode
    message: str
    retryable: bool = False


@dataclass(frozen=True)
class Expired(_Terminal):
    TYPE: ClassVar[str] = "expired"


@dataclass(frozen=True)
class Cancelled(_Terminal):
    TYPE: ClassVar[str] = "cancelled"


@dataclass(frozen=True)
class CancelMessage(_PerAttempt):
    """Frontend -> node control stream: drop this request (client gone, expired or re-dispatched)."""

    TYPE: ClassVar[str] = "cancel"
    reason: str


@dataclass(frozen=True)
class NodeEvent(_PerAttempt):
    """Node -> frontend, alongside results: one lifecycle event of a request (``received``,
    ``decoding``, ...). The frontend writes the request's whole record to ``{t}:log`` when it ends."""

    TYPE: ClassVar[str] = "event"
    event: str
    node: str
    detail: str
    ts_ms: int


@dataclass(frozen=True)
class _NodeCommand:
    """Operator (or planner) -> one node's control stream: an order for the node as a whole.
    ``incarnation`` is the registration it is meant for: a restarted node (a new incarnation reading
    the same stream from its start) drops commands sent to its previous life."""

    command_id: str
    incarnation: str
    reason: str
    requested_by: str  # who asked: "cli:<user>@<host>", "planner", ... (shown by `splitwise inspect`)
    grace_s: float  # running work may finish for this long; then it is handed back to its frontends
    issued_ms: int


@dataclass(frozen=True)
class DrainRequest(_NodeCommand):
    """Stop taking work, move or finish what runs, deregister and exit (0)."""

    TYPE: ClassVar[str] = "drain"


@dataclass(frozen=True)
class RoleChangeRequest(_NodeCommand):
    """Drain without exiting, switch to ``role`` (engine and weights kept), register again."""

    TYPE: ClassVar[str] = "role_change"
    role: Role

    def __post_init__(self) -> None:
        _set_enum(self, "role", Role, "role")


NodeCommand = DrainRequest | RoleChangeRequest
CONTROL_TYPES = (CancelMessage, DrainRequest, RoleChangeRequest)  # what a node's control stream carries

ResultMessage = TokenChunk | Finished | Failed | Expired | Cancelled
Message = (
    NodeInfo
    | WorkItem
    | TokenChunk
    | Finished
    | Failed
    | Expired
    | Cancelled
    | CancelMessage
    | NodeEvent
    | DrainRequest
    | RoleChangeRequest
)
CODEC = MessageCodec(
    (
        NodeInfo,
        WorkItem,
        TokenChunk,
        Finished,
        Failed,
        Expired,
        Cancelled,
        CancelMessage,
        NodeEvent,
        DrainRequest,
        RoleChangeRequest,
    ),
    schema_version=SCHEMA_VERSION,
    error=MessageDecodeError,
    tag_attr="TYPE",
    fields_key="f",
)
RESULT_TYPES = (TokenChunk, Finished, Failed, Expired, Cancelled)
RESULTS_STREAM_TYPES = (*RESULT_TYPES, NodeEvent)


@dataclass(frozen=True)
class SubmitRequest:
    """What the HTTP layer hands ``FrontendScheduler.submit`` (in-process only, never on the wire)."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    model_id: str | None = None  # None: the frontend's own model
    ttl_s: float | None = None  # None: --scheduler-ttl


def _set_enum(message: object, name: str, enum_type: type[Role], flag: str) -> None:
    value = getattr(message, name)
    try:
        object.__setattr__(message, name, enum_type(value))
    except ValueError:
        raise ValueError(f"{flag}: {value!r} is not one of {[m.value for m in enum_type]}") from None


def encode(msg: Message) -> bytes:
    return CODEC.encode(msg)


def decode(payload: bytes, expect: type | tuple[type, ...] | None = None) -> Any:
    """Decode one payload; ``expect`` restricts the accepted classes. Raises MessageDecodeError."""
    return CODEC.decode(payload, expect)
