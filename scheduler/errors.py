"""Error root of the scheduler package, split by cause.

``retryable`` says whether the same call may succeed later without any change (Redis came back,
a node registered), as opposed to bad input or a broken payload. The HTTP layer maps
``NoCapacityError`` to 503 and an ``expired`` terminal message to 504.
"""

from __future__ import annotations

from splitwise.errors import SplitwiseError


class SchedulerError(SplitwiseError):
    """Root of every error the scheduler raises on purpose."""

    retryable: bool = False

    def __init__(self, message: str, *, req_id: str | None = None, node_id: str | None = None) -> None:
        super().__init__(message)
        self.req_id = req_id
        self.node_id = node_id


class NoCapacityError(SchedulerError):
    """No live, compatible prefill/decode pair (or mixed node) can take the request right now."""

    retryable = True


class SchedulerConnectionError(SchedulerError):
    """Redis is unreachable (after the retry policy gave up) or refused our credentials."""

    retryable = True


class RedisVersionError(SchedulerError):
    """The Redis server is older than the commands we use (XAUTOCLAIM, GETDEL, ... need >= 6.2)."""


class MessageDecodeError(SchedulerError):
    """A payload is not a valid message of this schema version (poison; goes to the dead letters)."""


class DuplicateRequestError(SchedulerError):
    """``submit`` was called with a req_id this frontend already has in flight."""


class UnknownRequestError(SchedulerError):
    """An operation named a req_id this scheduler side does not hold."""


class SchedulerClosedError(SchedulerError):
    """The scheduler side was closed (or not started) when the call came in."""
