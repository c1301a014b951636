"""Delivering a request's choices (a ChoiceSet of Generations) to its client: Server-Sent Events or one JSON body, and cancelling the
request on every node when the client goes away.

Disconnects are detected in both phases of a response:
  * before the response starts (non-streaming requests, and streaming ones until the first token,
    which we wait for so that an early failure still gets its real HTTP status): the work races a
    task that waits for ``http.disconnect`` on the ASGI receive channel;
  * while streaming: Starlette cancels the body when the client disconnects, and ``SSEResponse``
    aborts the generation once the body has stopped, however it stopped.

SSE framing, as OpenAI sends it: ``data: <json>\\n\\n`` per chunk, then ``data: [DONE]\\n\\n``. An error
after the headers were sent travels as one ``data: {"error": {...}}`` event before ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any, Protocol, TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from splitwise.api.choices import ChoiceEvent, ChoiceSet
from splitwise.api.errors import ApiError, BackendError, ClientDisconnectedError
from splitwise.logging import bind_request, get_logger

log = get_logger("splitwise.api")
T = TypeVar("T")

DONE_EVENT = "data: [DONE]\n\n"


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def _until_disconnected(request: Request) -> None:
    # The body was read already, so the next message on the channel is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T], generation: ChoiceSet) -> T:
    """Await ``work`` unless the client disconnects first; then abort the generation and raise
    ClientDisconnectedError (the error boundary counts it as ``cancelled``)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(watcher, task, return_exceptions=True)
    if task.cancelled() or not task.done():
        await generation.abort()
        raise ClientDisconnectedError("the client disconnected", code="client_disconnected")
    return task.result()


async def collect(choices: ChoiceSet) -> list[ChoiceEvent]:
    return [event async for event in choices.events()]


async def first_delta(events: AsyncIterator[ChoiceEvent]) -> ChoiceEvent | None:
    """The first event (None only when there are no choices)."""
    return await anext(events, None)


class ChunkFormatter(Protocol):
    """What an endpoint sends for each phase of a stream: ``event`` gets each choice's deltas and
    its end (``delta is None``: the choice's finish_reason is set); ``closing`` the usage."""

    def opening(self) -> Iterable[BaseModel]: ...

    def event(self, event: ChoiceEvent) -> Iterable[BaseModel]: ...

    def closing(self, choices: ChoiceSet) -> Iterable[BaseModel]: ...


class SSEResponse(StreamingResponse):
    """A StreamingResponse that settles its Generation however the body ended: it counts the outcome
    exactly once and aborts the request on the nodes if the client left before the end."""

    def __init__(
        self,
        generation: ChoiceSet,
        first: ChoiceEvent | None,
        rest: AsyncIterator[ChoiceEvent],
        formatter: ChunkFormatter,
        endpoint: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.generation = generation
        self.endpoint = endpoint
        self.outcome = "cancelled"  # until the body says otherwise
        super().__init__(
            self._events(first, rest, formatter),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True), bind_request(self.generation.req_id):
                await self._settle()

    async def _settle(self) -> None:
        if self.outcome == "cancelled":
            await self.generation.abort()
        self.generation.ctx.record_outcome(self.endpoint, self.outcome, self.generation)

    async def _events(
        self, first: ChoiceEvent | None, rest: AsyncIterator[ChoiceEvent], formatter: ChunkFormatter
    ) -> AsyncIterator[str]:
        with bind_request(self.generation.req_id):
            try:
                for chunk in formatter.opening():
                    yield sse_event(chunk)
                if first is not None:
                    for chunk in formatter.event(first):
                        yield sse_event(chunk)
                    async for event in rest:
                        for chunk in formatter.event(event):
                            yield sse_event(chunk)
                for chunk in formatter.closing(self.generation):
                    yield sse_event(chunk)
                self.outcome = "success"
            except ApiError as exc:  # the status line is gone: the error becomes an event
                self.outcome = exc.outcome
                log.warning(
                    "stream_failed", status=exc.status_code, error_type=exc.error_type, message=exc.message
                )
                yield sse_event(exc.to_body())
            except Exception as exc:  # a bug: still answered, logged with its traceback and counted
                self.outcome = "internal_error"
                log.error("stream_crashed", exc_info=exc)
                yield sse_event(BackendError(f"internal error: {type(exc).__name__}").to_body())
                await self.generation.abort()
            yield DONE_EVENT


async def respond_streaming(
    request: Request,
    choices: ChoiceSet,
    formatter: ChunkFormatter,
    endpoint: str,
    headers: dict[str, str] | None = None,
) -> SSEResponse:
    """Wait for the first event (an early failure still gets its HTTP status), then stream the rest."""
    events = choices.events()
    first = await unless_disconnected(request, first_delta(events), choices)
    return SSEResponse(choices, first, events, formatter, endpoint, headers)
