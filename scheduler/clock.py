"""Injectable time and back-off strategy objects (kept outside the I/O code so tests control them).

``Clock.time_ms`` is wall time because deadlines cross processes and machines; ``monotonic`` is for
local intervals only.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field


class Clock:
    """Real time. Tests pass a subclass that shifts or freezes it."""

    def time_ms(self) -> int:
        return int(time.time() * 1000)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = Clock()


@dataclass
class ExponentialBackoff:
    """Capped exponential back-off with full jitter: attempt n waits uniform(0, min(cap, base * 2**n)).

    Used by every loop that talks to Redis, so an outage means a few reconnect tries per second at
    most, never a hot spin. ``reset()`` after a success.
    """

    base_s: float = 0.05
    cap_s: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def next_delay_s(self) -> float:
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self.failures, 30)))
        self.failures += 1
        # Never below base/2: full jitter can draw ~0, which would be a hot retry.
        return max(self.base_s / 2, self.rng.uniform(0, ceiling))

    def reset(self) -> None:
        self.failures = 0
