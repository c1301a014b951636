"""The per-request result stream handed to the HTTP layer (shared by the Redis and local schedulers)."""

from __future__ import annotations

import asyncio

from scheduler.messages import ResultMessage


class ResultStream:
    """Async iterator of result messages for one request: token chunks, then exactly one terminal
    message (Finished | Failed | Expired | Cancelled), after which iteration stops."""

    def __init__(self, req_id: str) -> None:
        self.req_id = req_id
        self._queue: asyncio.Queue[ResultMessage] = asyncio.Queue()
        self._done = False

    def put(self, msg: ResultMessage) -> None:
        self._queue.put_nowait(msg)

    def __aiter__(self) -> ResultStream:
        return self

    async def __anext__(self) -> ResultMessage:
        if self._done:
            raise StopAsyncIteration
        msg = await self._queue.get()
        if msg.is_terminal:
            self._done = True
        return msg

    async def collect(self) -> list[ResultMessage]:
        """Every message until the terminal one (tests, simple clients)."""
        return [msg async for msg in self]
