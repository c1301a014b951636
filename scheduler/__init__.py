"""The splitwise scheduler: Redis-coordinated P/D dispatch (``--scheduler-name splitwise``) and an
in-process equivalent (``--scheduler-name local``).

Frontend side: ``FrontendScheduler`` (submit/cancel, ResultStream). Node side: ``NodeAgent``
(next_work/publish/ack/release_prefill/cancellations). Messages: ``scheduler.messages``.
Keys: ``scheduler.keys`` and docs/redis-keys.md.
"""

from __future__ import annotations

from scheduler.config import SchedulerConfig, scheduler_options
from scheduler.errors import (
    DuplicateRequestError,
    MessageDecodeError,
    NoCapacityError,
    RedisVersionError,
    SchedulerClosedError,
    SchedulerConnectionError,
    SchedulerError,
    UnknownRequestError,
)
from scheduler.frontend import FrontendScheduler
from scheduler.local import LocalScheduler
from scheduler.messages import (
    Assignment,
    Cancelled,
    CancelMessage,
    Expired,
    Failed,
    Finished,
    KVGeometry,
    LoadReport,
    NodeInfo,
    ResultMessage,
    SubmitRequest,
    TokenChunk,
    WorkItem,
)
from scheduler.node import NodeAgent
from scheduler.streams import ResultStream

__all__ = [
    "Assignment",
    "CancelMessage",
    "Cancelled",
    "DuplicateRequestError",
    "Expired",
    "Failed",
    "Finished",
    "FrontendScheduler",
    "KVGeometry",
    "LoadReport",
    "LocalScheduler",
    "MessageDecodeError",
    "NoCapacityError",
    "NodeAgent",
    "NodeInfo",
    "RedisVersionError",
    "ResultMessage",
    "ResultStream",
    "SchedulerClosedError",
    "SchedulerConfig",
    "SchedulerConnectionError",
    "SchedulerError",
    "SubmitRequest",
    "TokenChunk",
    "UnknownRequestError",
    "WorkItem",
    "scheduler_options",
]
