"""``--scheduler-name local``: the frontend and node interfaces in-process, without Redis, for one
mixed instance. Same contracts as FrontendScheduler / NodeAgent (the engine code cannot tell them
apart); there is no other node to re-dispatch to, so a lost request can only expire or be cancelled.

    sched = LocalScheduler(config, model_id="m")
    await sched.node.start(info); await sched.frontend.start()
    stream = await sched.frontend.submit(req)       # HTTP side
    work = await sched.node.next_work()             # engine side
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from scheduler.clock import SYSTEM_CLOCK, Clock
from scheduler.config import SchedulerConfig
from scheduler.errors import DuplicateRequestError, NoCapacityError, SchedulerClosedError
from scheduler.messages import (
    Assignment,
    Cancelled,
    CancelMessage,
    Expired,
    Failed,
    NodeInfo,
    ResultMessage,
    SubmitRequest,
    TokenChunk,
    WorkItem,
)
from scheduler.metrics import Counters
from scheduler.streams import ResultStream
from splitwise.codes import FailureCode, Mode
from splitwise.logging import get_logger

log = get_logger("scheduler.local")


@dataclass
class _Request:
    stream: ResultStream
    work: WorkItem
    delivered: int = 0


@dataclass
class _State:
    config: SchedulerConfig
    model_id: str
    clock: Clock
    node: NodeInfo | None = None
    work: asyncio.Queue[WorkItem] = field(default_factory=asyncio.Queue)
    cancels: asyncio.Queue[CancelMessage] = field(default_factory=asyncio.Queue)
    requests: dict[str, _Request] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)
    stats: Counters = field(default_factory=Counters)

    def finish(self, req_id: str, terminal: ResultMessage, *, tell_node: str | None) -> None:
        req = self.requests.pop(req_id, None)
        if req is None:
            return
        req.stream.put(terminal)
        self.stats.inc("terminal_" + terminal.TYPE)
        if tell_node is not None:
            self.cancelled.add(req_id)
            self.cancels.put_nowait(CancelMessage(req_id=req_id, attempt=0, reason=tell_node))


class LocalFrontend:
    def __init__(self, state: _State) -> None:
        self._s = state
        self._monitor: asyncio.Task[None] | None = None
        self.frontend_id = "local"

    async def start(self) -> None:
        self._monitor = asyncio.create_task(self._expire_loop(), name="local-expiry")

    async def submit(self, request: SubmitRequest) -> ResultStream:
        s = self._s
        if self._monitor is None:
            raise SchedulerClosedError("local scheduler frontend is not started", req_id=request.req_id)
        if s.node is None or s.node.role != "mixed":
            raise NoCapacityError("the local scheduler needs one started mixed node", req_id=request.req_id)
        if request.req_id in s.requests:
            raise DuplicateRequestError(
                f"request {request.req_id} is already in flight", req_id=request.req_id
            )
        now = s.clock.time_ms()
        ttl_s = request.ttl_s if request.ttl_s is not None else s.config.scheduler_ttl_s
        node = s.node
        work = WorkItem(
            req_id=request.req_id,
            prompt_token_ids=list(request.prompt_token_ids),
            sampling_params=request.sampling_params,
            frontend_id=self.frontend_id,
            created_ms=now,
            deadline_ms=now + int(ttl_s * 1000),
            attempt=0,
            resume_token_ids=[],
            assignment=Assignment(
                mode=Mode.MIXED,
                prefill_node_id=node.node_id,
                decode_node_id=node.node_id,
                prefill_host=node.host,
                prefill_incarnation=node.incarnation,
                decode_incarnation=node.incarnation,
            ),
        )
        stream = ResultStream(request.req_id)
        s.requests[request.req_id] = _Request(stream, work)
        s.work.put_nowait(work)
        s.stats.inc("submitted")
        return stream

    async def cancel(self, req_id: str) -> bool:
        if req_id not in self._s.requests:
            return False
        self._s.finish(req_id, Cancelled(req_id=req_id, attempt=0), tell_node="cancelled")
        return True

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        self._monitor = None

    async def _expire_loop(self) -> None:
        s = self._s
        while True:
            await s.clock.sleep(s.config.heartbeat_interval_s)
            now = s.clock.time_ms()
            for req_id, req in list(s.requests.items()):
                if now >= req.work.deadline_ms:
                    s.finish(req_id, Expired(req_id=req_id, attempt=0), tell_node="expired")


class LocalNode:
    def __init__(self, state: _State) -> None:
        self._s = state

    @property
    def node_id(self) -> str:
        if self._s.node is None:
            raise SchedulerClosedError("local node is not started")
        return self._s.node.node_id

    async def start(self, node_info: NodeInfo) -> None:
        if node_info.role != "mixed":
            raise ValueError(
                f"--splitwise-role: the local scheduler serves one mixed node, got {node_info.role!r}"
            )
        self._s.node = dataclasses.replace(
            node_info, incarnation=uuid.uuid4().hex[:16], started_ms=self._s.clock.time_ms()
        )

    async def next_work(self) -> WorkItem:
        while True:
            work = await self._s.work.get()
            if work.req_id in self._s.requests and work.req_id not in self._s.cancelled:
                return work
            self._s.stats.inc("dropped_cancelled")

    async def publish(self, result: ResultMessage, *, frontend_id: str | None = None) -> None:
        req = self._s.requests.get(result.req_id)
        if req is None:
            self._s.stats.inc("stale_results")
            return
        if isinstance(result, TokenChunk):
            req.stream.put(result)
            req.delivered += len(result.token_ids)
        else:
            self._s.finish(result.req_id, result, tell_node=None)

    async def ack(self, work: WorkItem) -> None:
        """Done with ``work``. Acked without a terminal result, the request fails explicitly
        (there is no other node to re-dispatch to)."""
        self._s.cancelled.discard(work.req_id)
        if work.req_id in self._s.requests:
            self._s.stats.inc("acked_without_terminal")
            self._s.finish(
                work.req_id,
                Failed(
                    req_id=work.req_id,
                    attempt=0,
                    code=FailureCode.DROPPED_BY_NODE,
                    message="the node gave the request up",
                ),
                tell_node=None,
            )

    async def release_prefill(self, req_id: str, *, prefill_node_id: str | None = None) -> int:
        return 0  # nothing is booked in-process: the one node's own queue is the accounting

    async def mark(self, req_id: str, event: str, *, detail: str = "", node: str | None = None) -> None:
        log.debug("lifecycle", req_id=req_id, lifecycle_event=event, detail=detail)

    async def cancellations(self) -> AsyncIterator[CancelMessage]:
        while True:
            yield await self._s.cancels.get()

    def is_cancelled(self, req_id: str, attempt: int) -> bool:
        return req_id in self._s.cancelled

    async def close(self) -> None:
        self._s.node = None


class LocalScheduler:
    """Both sides of the scheduler in one process: ``.frontend`` and ``.node``."""

    def __init__(
        self, config: SchedulerConfig | None = None, *, model_id: str = "local", clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.config = config or SchedulerConfig(scheduler_name="local")
        self._state = _State(config=self.config, model_id=model_id, clock=clock)
        self.frontend = LocalFrontend(self._state)
        self.node = LocalNode(self._state)

    @property
    def stats(self) -> Counters:
        return self._state.stats
