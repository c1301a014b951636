"""Named counters for every failure and notable event a scheduler side sees (``stats`` in tests/inspect).

The type is the project's one counter type, ``splitwise.counters.Counters``.
"""

from __future__ import annotations

from splitwise.counters import Counters

__all__ = ["Counters"]
