"""The two sides of the scheduler as Protocols. ``FrontendScheduler``/``NodeAgent`` (Redis) and
``LocalScheduler.frontend``/``.node`` (in-process) both satisfy them.

Frontend side (the HTTP server process; owns each request's lifecycle):
    start() -> submit(req) -> iterate the ResultStream -> [cancel(req_id)] -> close()
Node side (the instance process, next to the engine loop):
    start(info) -> loop { next_work() -> publish(chunk)* -> publish(terminal) -> ack(work) } -> close()
    a prefill node calls release_prefill(req_id) once its prefill and KV send are done;
    cancellations() yields CancelMessages for requests this node runs (as D or as P).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from scheduler.messages import CancelMessage, NodeInfo, ResultMessage, SubmitRequest, WorkItem
from scheduler.streams import ResultStream


class FrontendSide(Protocol):
    async def start(self) -> None:
        """Connect and read the cluster. Raises SchedulerConnectionError / RedisVersionError."""

    async def submit(self, request: SubmitRequest) -> ResultStream:
        """Dispatch now; never blocks on capacity. Raises NoCapacityError (503) when no live compatible
        pair or mixed node exists. The stream yields TokenChunks in order, de-duplicated across
        re-dispatch, then exactly one terminal message (Finished | Failed | Expired | Cancelled)."""
        ...

    async def cancel(self, req_id: str) -> bool:
        """Client went away: the stream ends with Cancelled and the nodes are told. False if not in flight."""
        ...

    async def close(self) -> None:
        """In-flight requests end with Failed(code="scheduler_closed")."""


class NodeSide(Protocol):
    async def start(self, node_info: NodeInfo) -> None:
        """Register (fresh incarnation) and heartbeat with the load provider given at construction."""

    async def next_work(self) -> WorkItem:
        """Block for the next runnable item. The item stays pending until ack(): a crash never loses it.
        For disagg items this node is D: reserve KV blocks, then drive P over the pd-comm channel.
        ``resume_token_ids`` are tokens the client already has: continue after them, emitting
        TokenChunk.index = len(resume_token_ids) + position."""
        ...

    async def publish(self, result: ResultMessage, *, frontend_id: str | None = None) -> None:
        """Send a result to the originating frontend (ordered per request). A token chunk may return
        before it reached Redis (it queues behind at most one write in flight); a terminal message
        leaves with the ``ack`` that must follow it. Results of an attempt the frontend abandoned are
        ignored there, so publishing late is harmless."""

    async def ack(self, work: WorkItem) -> None:
        """Done with ``work`` (terminal published or dropped): remove it and release its bookings."""

    async def release_prefill(self, req_id: str, *, prefill_node_id: str | None = None) -> int:
        """P finished the prefill and KV send. With the Redis scheduler the decode node that holds the
        request releases the prompt-token booking (idempotent); on P this returns 0 at no cost."""
        ...

    async def mark(self, req_id: str, event: str, *, detail: str = "", node: str | None = None) -> None:
        """Record a lifecycle event (best effort, never raises)."""

    def cancellations(self) -> AsyncIterator[CancelMessage]:
        """CancelMessages for this node (client gone, expired, re-dispatched elsewhere). One consumer."""
        ...

    def is_cancelled(self, req_id: str, attempt: int) -> bool: ...

    async def close(self) -> None:
        """Deregister at once; frontends re-dispatch whatever this node still held."""
