"""Error root of the engine package. Subclasses by cause; each renders itself."""

from __future__ import annotations

from splitwise.errors import SplitwiseError


class EngineError(SplitwiseError):
    """Root of every error the engine raises on purpose.

    ``retryable`` says whether the same call may succeed later without any change (e.g. out of
    blocks right now), as opposed to bad input or a broken checkpoint.
    """

    retryable: bool = False

    def __init__(self, message: str, *, req_id: str | None = None) -> None:
        super().__init__(message)
        self.req_id = req_id


class InvalidRequestError(EngineError):
    """The request itself is wrong: prompt too long, max_tokens < 1, bad sampling values."""


class ModelLoadError(EngineError):
    """The checkpoint cannot be loaded: missing files, unsupported architecture, bad shapes."""


class UnsupportedArchitectureError(ModelLoadError):
    """config.json names an architecture splitwise does not implement."""


class OutOfBlocksError(EngineError):
    """Not enough free KV blocks right now."""

    retryable = True


class UnknownRequestError(EngineError):
    """An operation named a req_id the engine does not hold."""
