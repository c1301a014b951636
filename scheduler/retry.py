"""The one retry/back-off helper of the scheduler: every background loop and every bounded retry of
one operation goes through ``Retrier`` (asyncio loops) or ``Retrier.run_sync`` (the heartbeat thread).

Rules, in one place:
- Redis-down errors (``REDIS_DOWN_ERRORS``) are counted as ``redis_errors``, logged as warnings and
  retried after ``ExponentialBackoff`` (capped, jittered, never a hot spin); success resets it.
- Any other exception in a background loop is a bug in handling one message: counted as
  ``<loop>_errors``, logged with the traceback, and the loop goes on after the same back-off.
- A bounded retry (``call``) gives up after its deadline with ``SchedulerConnectionError``.
- A step that failed on a key of the wrong type (``WRONGTYPE``, poison written by someone else)
  runs the owner's ``repair`` (scheduler.poison: dead-letter, delete, re-create) before the next
  try, so the loop heals instead of failing on the same key forever.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from scheduler.clock import Clock, ExponentialBackoff
from scheduler.connection import REDIS_DOWN_ERRORS
from scheduler.errors import SchedulerConnectionError
from scheduler.metrics import Counters
from scheduler.poison import is_wrong_type
from splitwise.logging import get_logger

log = get_logger("scheduler.retry")
T = TypeVar("T")


@dataclass
class Retrier:
    clock: Clock
    stats: Counters
    base_s: float = 0.05
    cap_s: float = 2.0
    # Set by the owner (node agent, frontend): repairs its keys after a WRONGTYPE answer.
    repair: Callable[[], Awaitable[object]] | None = None

    def backoff(self) -> ExponentialBackoff:
        return ExponentialBackoff(base_s=self.base_s, cap_s=self.cap_s)

    def _failed(self, name: str, exc: BaseException, backoff: ExponentialBackoff) -> float:
        """Count and log one failure; returns how long to wait before the next try."""
        if isinstance(exc, REDIS_DOWN_ERRORS):
            self.stats.inc("redis_errors")
            log.warning("redis_unavailable", op=name, error=str(exc))
        else:
            self.stats.inc(name + "_errors")
            log.error("loop_error", op=name, error=repr(exc), exc_info=exc)
        return backoff.next_delay_s()

    async def _repair_after(self, name: str, exc: BaseException) -> None:
        if self.repair is None or not is_wrong_type(exc):
            return
        try:
            await self.repair()
        except Exception as repair_exc:  # noqa: BLE001 - the next step retries the repair
            self.stats.inc("repair_errors")
            log.error("repair_failed", op=name, error=repr(repair_exc))

    async def loop(
        self, name: str, step: Callable[[], Awaitable[None]], *, running: Callable[[], bool]
    ) -> None:
        """Run ``step()`` until ``running()`` is false, surviving anything one step raises."""
        backoff = self.backoff()
        while running():
            try:
                await step()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a background loop must survive one bad step
                delay = self._failed(name, exc, backoff)
                await self._repair_after(name, exc)
                await self.clock.sleep(delay)

    async def call(self, name: str, op: Callable[[], Awaitable[T]], *, give_up_after_s: float) -> T:
        """``op()`` through Redis blips for up to ``give_up_after_s``, then SchedulerConnectionError."""
        backoff: ExponentialBackoff | None = None  # made on the first failure (the hot path never fails)
        give_up_at = self.clock.monotonic() + give_up_after_s
        while True:
            try:
                return await op()
            except Exception as exc:
                if not isinstance(exc, REDIS_DOWN_ERRORS) and not (self.repair and is_wrong_type(exc)):
                    raise
                backoff = backoff or self.backoff()
                delay = self._failed(name, exc, backoff)
                if self.clock.monotonic() >= give_up_at:
                    raise SchedulerConnectionError(f"{name}: Redis unavailable: {exc}") from None
                await self._repair_after(name, exc)
                await self.clock.sleep(delay)

    def run_sync(
        self, name: str, step: Callable[[], None], *, stop: threading.Event, period_s: float
    ) -> None:
        """The thread flavour of ``loop``: ``step()`` every ``period_s`` until ``stop`` is set."""
        backoff = self.backoff()
        delay = period_s
        while not stop.wait(delay):
            try:
                step()
                backoff.reset()
                delay = period_s
            except Exception as exc:  # noqa: BLE001 - the heartbeat thread must survive one bad beat
                delay = min(period_s, self._failed(name, exc, backoff))
