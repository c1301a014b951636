"""A node's writes, coalesced: results, booking releases and lifecycle records go out in one
pipeline per flush, shared by every request that queued something meanwhile.

Who waits for what:
- ``flush()`` returns once everything queued before the call is in Redis (or raises
  SchedulerConnectionError after the retry budget). Callers arriving during a flush ride on the next.
- ``send_soon()`` queues behind at most one flush in flight: it returns at once when none is being
  sent, else when that one is done (raising its error). Token chunks use it: the engine never
  waits a round trip per token, and a slow Redis still pushes back.
- A terminal result is queued without waiting; the ``ack`` that follows it queues the releases and
  waits, so tokens, terminal, release and ack of a short request are one round trip (and one XADD
  per frontend however many requests were flushed together).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from scheduler import scripts
from scheduler.config import SchedulerConfig
from scheduler.keys import KeySchema
from scheduler.retry import Retrier
from scheduler.scripting import Batch


@dataclass
class _Pending:
    results: dict[str, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    releases: list[tuple[str, str]] = field(default_factory=list)  # (booking member, candidate key)
    records: list[tuple[str, str]] = field(default_factory=list)  # (req_id, record text) for {t}:log

    def __bool__(self) -> bool:
        return bool(self.results or self.releases or self.records)


def log_fields(records: list[tuple[str, str]]) -> dict[str, str]:
    """One {t}:log entry for many requests: field = req_id, value = its record lines."""
    fields: dict[str, str] = {}
    for req_id, text in records:
        fields[req_id] = fields[req_id] + "\n" + text if req_id in fields else text
    return fields


class Outbox:
    def __init__(
        self, client: aioredis.Redis, keys: KeySchema, config: SchedulerConfig, retrier: Retrier
    ) -> None:
        self._client = client
        self._keys = keys
        self._config = config
        self._retrier = retrier
        self._pending = _Pending()
        self._next: asyncio.Future[None] | None = None
        self._sending: asyncio.Future[None] | None = None
        self._lock = asyncio.Lock()
        self.num_flushes = 0

    # --- queueing (no I/O) ------------------------------------------------------------------------
    def put_result(self, frontend_id: str, payload: bytes) -> None:
        self._pending.results[frontend_id].append(payload)

    def put_release(self, member: str, candidate_key: str) -> None:
        self._pending.releases.append((member, candidate_key))

    def put_record(self, req_id: str, text: str) -> None:
        self._pending.records.append((req_id, text))

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    # --- sending ---------------------------------------------------------------------------------------
    def schedule(self) -> asyncio.Future[None]:
        """Make sure a flush will carry what is queued now; returns the future of that flush."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().create_task(self._run(), name="node-outbox-flush")
        return self._next

    async def flush(self) -> None:
        await asyncio.shield(self.schedule())

    async def send_soon(self) -> None:
        self.schedule()
        sending = self._sending
        if sending is not None:
            await asyncio.shield(sending)

    async def _run(self) -> None:
        async with self._lock:  # one flush at a time; the next one carries what arrived meanwhile
            # One loop turn first: the producers that the previous flush's end woke (a request whose
            # token waited in send_soon, about to queue its terminal and ack) ride on this flush
            # instead of the next (one flush per short request, not two).
            await asyncio.sleep(0)
            future, self._next = self._next, None
            pending, self._pending = self._pending, _Pending()
            assert future is not None
            self._sending = future
            try:
                if pending:
                    await self._retrier.call(
                        "node_flush",
                        lambda: self._send(pending),
                        give_up_after_s=self._config.dead_after_ms / 1000,
                    )
                future.set_result(None)
            except Exception as exc:  # noqa: BLE001 - handed to every waiter of this flush
                future.set_exception(exc)
                future.exception()  # waiters may be gone (fire-and-forget terminals): mark retrieved
            finally:
                self._sending = None

    async def _send(self, pending: _Pending) -> list[Any]:
        self.num_flushes += 1
        batch = Batch(self._client)
        for frontend_id, payloads in pending.results.items():
            key = self._keys.results(frontend_id)
            fields: dict[Any, Any] = {f"m{i}": p for i, p in enumerate(payloads)}
            batch.add(
                lambda pipe, key=key, fields=fields: pipe.xadd(  # type: ignore[misc]
                    key, fields, maxlen=self._config.stream_maxlen, approximate=True, nomkstream=True
                )
            )
        if pending.releases:
            batch.script(
                scripts.RELEASE,
                [self._keys.bookings, *(key for _member, key in pending.releases)],
                [member for member, _key in pending.releases],
            )
        if pending.records:
            records: dict[Any, Any] = dict(log_fields(pending.records))
            batch.add(
                lambda pipe: pipe.xadd(
                    self._keys.log, records, maxlen=self._config.log_maxlen, approximate=True, nomkstream=True
                )
            )
        return await batch.execute()
