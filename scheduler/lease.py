"""Leases: how nodes and frontends tell each other they are alive, and how a death is decided.

Lease rules (docs/redis-keys.md, docs/architecture.md):
- A participant's lease is its entry in a sorted set (``{t}:alive`` for nodes, ``{t}:frontends``
  for frontends) scored by its expiry in *Redis server* milliseconds; each heartbeat (from a
  dedicated thread with its own connection, ``scheduler.heartbeat``) moves it to
  ``server now + interval x missed``. Server time means clock skew between machines cannot
  shorten or lengthen anybody's lease.
- A lease has *lapsed* when its expiry is in the past (or the entry is gone).
- A death is decided only after the lapse is seen again ``grace`` later (``LeaseWatch``): a
  frontend re-dispatches a node's work after a lapse confirmed one heartbeat interval later; a
  node aborts a request whose frontend's lease stayed lapsed for one more whole lease.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.clock import Clock


@dataclass
class ServerClock:
    """Local estimate of Redis server time: the offset is re-measured at every heartbeat."""

    clock: Clock
    offset_ms: int = 0

    def observe(self, server_now_ms: int) -> None:
        self.offset_ms = server_now_ms - self.clock.time_ms()

    def now_ms(self) -> int:
        return self.clock.time_ms() + self.offset_ms


@dataclass
class LeaseWatch:
    """Turns lease observations into death decisions that need a second look ``grace_ms`` later."""

    grace_ms: int
    _lapsed_since: dict[str, int] = field(default_factory=dict)

    def observe(self, who: str, *, expiry_ms: int | None, now_ms: int) -> bool:
        """Record one observation; True when ``who`` is dead (lapsed, and still lapsed after grace)."""
        if expiry_ms is not None and expiry_ms > now_ms:
            self._lapsed_since.pop(who, None)
            return False
        since = self._lapsed_since.setdefault(who, now_ms)
        # The lapse began at the later of our first look and the expiry of the lease seen now: a
        # renewal between two looks that we never saw (an earlier, transient lapse) must not count.
        began = since if expiry_ms is None else max(since, expiry_ms)
        return now_ms - began >= self.grace_ms

    @property
    def watching(self) -> bool:
        """Whether any lapse is being watched (a beat must report even an empty observation)."""
        return bool(self._lapsed_since)

    def forget(self, who: str) -> None:
        self._lapsed_since.pop(who, None)

    def retain(self, keep: set[str]) -> None:
        """Drop observations of participants nobody asks about any more (bounded memory)."""
        for who in set(self._lapsed_since) - keep:
            del self._lapsed_since[who]
