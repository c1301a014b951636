"""Errors every package's root derives from, so the one process boundary can tell ours from bugs."""

from __future__ import annotations


class SplitwiseError(Exception):
    """Base of all deliberate splitwise errors (EngineError, SchedulerError, TransferError, ...)."""

    retryable: bool = False
