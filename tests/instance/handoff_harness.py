"""A deterministic harness for the P/D hand-off: fake worker, channel, target, initiator, clock.

Nothing here sleeps or uses threads: every fake operation either completes at once or, when the
test ``hold``s it, waits on a gate the test opens. ``settle()`` runs the event loop until every
task is blocked, so a test orders events exactly ("cancel while the reservation is in flight",
"the result arrives after the timeout") and asserts the state in between.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from scheduler.clock import Clock
from scheduler.config import SchedulerConfig
from scheduler.messages import Assignment, WorkItem
from splitwise.counters import Counters
from splitwise.engine.config import EngineConfig
from splitwise.engine.errors import InvalidRequestError, OutOfBlocksError, UnknownRequestError
from splitwise.engine.model_runner import LayerCallback
from splitwise.engine.outputs import RequestOutput
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import FinishReason
from splitwise.instance.config import InstanceConfig
from splitwise.instance.engine_worker import PrefilledFirst
from splitwise.kv_geometry import KVGeometry
from splitwise.transfer.base import (
    DONE,
    PENDING,
    Endpoint,
    ReadyToken,
    TransferStatus,
    TransportInitiator,
    TransportTarget,
)
from splitwise.transfer.errors import ConnectionLostError
from splitwise.transfer.messages import CallMessage

BLOCK_SIZE = 4


async def settle(rounds: int = 50) -> None:
    """Let every runnable task run until it blocks (yields to the loop; no time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeClock(Clock):
    """Time moves only in ``advance``; ``sleep`` returns when enough of it has."""

    def __init__(self) -> None:
        self.now_s = 1000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self.now_s

    def time_ms(self) -> int:
        return int(self.now_s * 1000)

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now_s + seconds, future))
        await future

    async def advance(self, seconds: float) -> None:
        self.now_s += seconds
        due = [(t, f) for t, f in self._sleepers if t <= self.now_s]
        self._sleepers = [(t, f) for t, f in self._sleepers if t > self.now_s]
        for _, future in due:
            if not future.done():
                future.set_result(None)
        await settle()


class Gates:
    """Operations a test may hold: ``hold(name)`` makes the next calls wait until ``open(name)``."""

    def __init__(self) -> None:
        self._held: set[str] = set()
        self._waiting: dict[str, list[asyncio.Future[None]]] = defaultdict(list)

    def hold(self, name: str) -> None:
        self._held.add(name)

    def is_waiting(self, name: str) -> bool:
        return bool(self._waiting[name])

    async def pass_(self, name: str) -> None:
        if name in self._held:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting[name].append(future)
            await future

    async def open(self, name: str) -> None:
        self._held.discard(name)
        for future in self._waiting.pop(name, []):
            future.set_result(None)
        await settle()


class FakeWorker:
    """The engine worker, as plain data: a block pool with exact ids, and a log of calls in the
    order the real worker's command queue would run them."""

    def __init__(self, num_kv_blocks: int = 32) -> None:
        self.block_size = BLOCK_SIZE
        self.num_kv_blocks = num_kv_blocks
        self.free = list(range(num_kv_blocks))
        self.reservations: dict[str, list[int]] = {}  # by reservation (hand-off) id
        self.adopted: dict[str, list[int]] = {}  # req_id -> the reservation it took when admitted
        self.admitted: dict[str, int] = {}  # req_id -> first token
        self.admitted_extras: dict[str, tuple[Any, Any]] = {}  # req_id -> (top logprobs, prompt logprobs)
        self.submitted: dict[str, tuple[list[int], SamplingParams, bool]] = {}
        self.outputs: dict[str, asyncio.Queue[RequestOutput]] = {}
        self.log: list[tuple[str, str]] = []
        self.gates = Gates()
        self.layer_callback: LayerCallback | None = None
        self.invalid_prompts: set[tuple[int, ...]] = set()

    async def validate_prompt(self, req_id: str, prompt_token_ids: list[int]) -> None:
        self.log.append(("validate", req_id))
        if tuple(prompt_token_ids) in self.invalid_prompts:
            raise InvalidRequestError("prompt token ids outside the vocabulary", req_id=req_id)

    async def reserve(self, req_id: str, num_tokens: int) -> list[int]:
        self.log.append(("reserve", req_id))
        await self.gates.pass_("reserve")
        num_blocks = -(-num_tokens // self.block_size)
        if num_blocks > len(self.free):
            raise OutOfBlocksError(f"{num_blocks} blocks wanted, {len(self.free)} free", req_id=req_id)
        self.reservations[req_id], self.free = self.free[:num_blocks], self.free[num_blocks:]
        return list(self.reservations[req_id])

    async def release_reservation(self, req_id: str) -> None:
        self.log.append(("release_reservation", req_id))
        await self.gates.pass_("release_reservation")
        self.free.extend(self.reservations.pop(req_id, []))

    async def admit_prefilled(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        first: PrefilledFirst,
        reservation_id: str | None = None,
    ) -> asyncio.Queue[RequestOutput]:
        self.log.append(("admit", req_id))
        self.admitted_extras[req_id] = (first.top_logprobs, first.prompt_logprobs)
        if (reservation_id or req_id) not in self.reservations:
            raise UnknownRequestError("no KV reservation for this request", req_id=req_id)
        self.admitted[req_id] = first.token_id
        self.adopted[req_id] = self.reservations.pop(reservation_id or req_id)
        out_q = self.outputs[req_id] = asyncio.Queue()
        out_q.put_nowait(
            RequestOutput(req_id=req_id, new_token_ids=[first.token_id], new_logprobs=[first.logprob])
        )
        return out_q

    def submit(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams, *, prefill_only: bool = False
    ) -> asyncio.Queue[RequestOutput]:
        self.log.append(("submit", req_id))
        self.submitted[req_id] = (list(prompt_token_ids), params, prefill_only)
        out_q = self.outputs[req_id] = asyncio.Queue()
        return out_q

    def abort(self, req_id: str) -> None:
        self.log.append(("abort", req_id))
        out_q = self.outputs.get(req_id)
        if out_q is not None:
            out_q.put_nowait(RequestOutput(req_id=req_id, finish_reason=FinishReason.ABORT))

    def finish_prefill(
        self,
        req_id: str,
        first_token_id: int = 7,
        logprob: float = -0.5,
        top_logprobs: list[tuple[int, float]] | None = None,
    ) -> None:
        """P side: the engine finished the prefill-only request."""
        self.outputs[req_id].put_nowait(
            RequestOutput(
                req_id=req_id,
                new_token_ids=[first_token_id],
                new_logprobs=[logprob],
                new_top_logprobs=[top_logprobs] if top_logprobs is not None else [],
                finish_reason=FinishReason.PREFILL_DONE,
            )
        )

    async def release_prefill(self, req_id: str) -> None:
        self.log.append(("release_prefill", req_id))

    def set_layer_callback(self, callback: LayerCallback | None) -> None:
        self.layer_callback = callback

    def calls(self, name: str) -> list[str]:
        return [req_id for op, req_id in self.log if op == name]


@dataclass
class FakeConnection:
    peer_id: str
    closed_reason: str | None = None

    @property
    def is_closed(self) -> bool:
        return self.closed_reason is not None


@dataclass
class FakeChannel:
    """Records every call; ``refuse`` makes calls of a message type raise; ``unreachable`` makes
    connecting fail; ``hold`` (through gates) makes calls wait."""

    sent: list[CallMessage] = field(default_factory=list)
    connections: dict[str, FakeConnection] = field(default_factory=dict)
    refuse: dict[type, Exception] = field(default_factory=dict)
    unreachable: set[str] = field(default_factory=set)
    gates: Gates = field(default_factory=Gates)

    async def connection_to(self, peer_id: str, host: str, port: int) -> FakeConnection:
        await self.gates.pass_("connect")
        if peer_id in self.unreachable:
            raise ConnectionLostError("connection refused", peer=peer_id)
        conn = self.connections.get(peer_id)
        if conn is None or conn.is_closed:
            conn = self.connections[peer_id] = FakeConnection(peer_id)
        return conn

    async def call(self, conn: Any, message: CallMessage, timeout_s: float | None = None) -> None:
        self.sent.append(message)
        await self.gates.pass_(type(message).__name__)
        error = self.refuse.get(type(message))
        if error is not None:
            raise error

    async def close_connection(self, conn: Any, reason: str) -> None:
        conn.closed_reason = reason

    def of_type(self, cls: type) -> list[Any]:
        return [m for m in self.sent if isinstance(m, cls)]


class FakeTarget(TransportTarget):
    """D's transport target: ``land(req_id)`` / ``fail(req_id)`` decide what ``poll`` says."""

    protocol = "tcp"

    def __init__(self) -> None:
        self.counters = Counters()
        self.expected: dict[str, list[int]] = {}
        self.status: dict[str, TransferStatus] = {}
        self.forgotten: list[str] = []
        self.revoked: list[str] = []
        self.revoke_confirms = True  # False: a wedged ipc peer (the revoke cannot be confirmed)

    def register(self, kv_cache: Any) -> None:
        pass

    def endpoint(self) -> Endpoint:
        return Endpoint("tcp", "127.0.0.1", 1, KVGeometry("float32", BLOCK_SIZE, 2, 2, 8, num_blocks=32))

    def expect(self, req_id: str, dst_block_ids: Sequence[int], timeout_s: float | None = None) -> None:
        self.expected[req_id] = list(dst_block_ids)
        self.status[req_id] = PENDING

    def land(self, req_id: str) -> None:
        self.status[req_id] = DONE

    def poll(self, req_id: str) -> TransferStatus:
        return self.status.get(req_id, TransferStatus(PENDING.state))

    def forget(self, req_id: str) -> None:
        self.forgotten.append(req_id)
        self.expected.pop(req_id, None)

    def revoke(self, peer_id: str) -> bool:
        self.revoked.append(peer_id)
        return self.revoke_confirms

    def close(self) -> None:
        pass


class FakeInitiator(TransportInitiator):
    """P's transport initiator: records writes; ``wait`` returns what the test set in ``verdict``."""

    protocol = "tcp"

    def __init__(self) -> None:
        self.counters = Counters()
        self.connected: list[str] = []
        self.writes: list[tuple[str, int, list[int], list[int]]] = []
        self.ready_tokens: list[ReadyToken | None] = []  # the producer's token of each write
        self.aborted: list[tuple[str, str]] = []  # abort_peer(peer_id, reason) calls
        self.finished: list[str] = []
        self.forgotten: list[str] = []
        self.verdict: dict[str, TransferStatus] = {}

    def register(self, kv_cache: Any) -> None:
        pass

    def connect(self, peer_id: str, endpoint: Endpoint) -> None:
        self.connected.append(peer_id)

    def write_layer(
        self,
        peer_id: str,
        req_id: str,
        layer: int,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
        ready: ReadyToken | None = None,
    ) -> None:
        self.writes.append((req_id, layer, list(src_block_ids), list(dst_block_ids)))
        self.ready_tokens.append(ready)

    def finish(self, peer_id: str, req_id: str) -> None:
        self.finished.append(req_id)

    def poll(self, req_id: str) -> TransferStatus:
        return self.verdict.get(req_id, PENDING)

    def wait(self, req_id: str, timeout_s: float) -> TransferStatus:
        return self.poll(req_id)

    def forget(self, req_id: str) -> None:
        self.forgotten.append(req_id)

    def abort_peer(self, peer_id: str, reason: str) -> None:
        self.aborted.append((peer_id, reason))

    def close(self) -> None:
        pass


class StepOffload:
    """The prefill flow's ``offload`` (blocking transport calls): held until ``run_next``, in order."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self.auto = True  # run at once unless a test turns stepping on

    async def __call__(self, fn: Callable[[], Any]) -> Any:
        if self.auto:
            return fn()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending.append((fn, future))
        return await future

    async def run_next(self) -> None:
        fn, future = self.pending.pop(0)
        try:
            future.set_result(fn())
        except Exception as exc:  # handed to the awaiting flow, as the executor would
            future.set_exception(exc)
        await settle()


def decode_config(**changes: Any) -> InstanceConfig:
    return InstanceConfig(
        engine=EngineConfig(model="tiny"),
        scheduler=SchedulerConfig(scheduler_name="splitwise"),
        role="decode",
        transfer_timeout_s=changes.pop("transfer_timeout_s", 5.0),
        **changes,
    )


def work_item(req_id: str = "r1", num_prompt_tokens: int = 10, peer: str = "P1", **params: Any) -> WorkItem:
    return WorkItem(
        req_id=req_id,
        prompt_token_ids=list(range(1, num_prompt_tokens + 1)),
        sampling_params=SamplingParams(**{"max_tokens": 4, **params}),
        frontend_id="F1",
        created_ms=0,
        deadline_ms=10**12,
        attempt=1,
        resume_token_ids=[],
        assignment=Assignment(
            mode="disagg",
            prefill_node_id=peer,
            decode_node_id="D1",
            protocol="tcp",
            prefill_host="127.0.0.1",
            prefill_pd_comm_port=1,
        ),
    )
