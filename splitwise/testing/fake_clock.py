"""A clock tests control: time moves only when the test (or a ``sleep``) moves it.

``sleep`` advances the clock by the requested time and yields once to the event loop, so code that
paces itself with ``clock.sleep`` runs its iterations back to back and deterministically.
"""

from __future__ import annotations

import asyncio

from scheduler.clock import Clock


class FakeClock(Clock):
    def __init__(self, start_ms: int = 1_000_000) -> None:
        self.now_ms = start_ms
        self.sleeps: list[float] = []

    def time_ms(self) -> int:
        return self.now_ms

    def monotonic(self) -> float:
        return self.now_ms / 1000

    def advance(self, seconds: float) -> None:
        self.now_ms += int(round(seconds * 1000))

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)
        await asyncio.sleep(0)
