"""Errors of the tensor-parallel engine. Every one is fatal to the instance: a group with a lost
rank cannot run another step, so the engine worker fails the in-flight requests and the instance
exits non-zero (its node deregisters; the scheduler treats it as any dead node)."""

from __future__ import annotations

from splitwise.engine.errors import EngineError


class TensorParallelError(EngineError):
    """A collective failed or timed out, or a rank could not start."""

    fatal = True


class RankLostError(TensorParallelError):
    """A rank process exited (or the collective with it broke)."""

    def __init__(self, message: str, *, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank
