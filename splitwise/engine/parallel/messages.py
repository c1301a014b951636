"""What crosses between rank processes, through the one codec (``splitwise.wire_codec``).

message     from -> to                 how
RankLaunch  rank 0 -> rank r (spawn)   the child's stdin, length-prefixed, once
StepPlan    rank 0 -> all ranks        control-group broadcast, once per step
Shutdown    rank 0 -> all ranks        control-group broadcast, at close
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import ClassVar

from splitwise.engine.config import EngineConfig
from splitwise.engine.parallel.errors import TensorParallelError
from splitwise.wire_codec import MessageCodec

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class RankLaunch:
    TAG: ClassVar[str] = "rank_launch"
    engine: EngineConfig
    rank: int
    world_size: int
    store_port: int
    kv_shm_name: str  # CPU: the instance's KV buffer (the rank maps its head slice); CUDA: "" (own)
    num_kv_blocks: int
    compute_timeout_s: float
    num_threads: int


@dataclass(frozen=True)
class PlanChunk:
    """One sequence's share of a step, as plain data: what the runner reads off a Sequence."""

    start: int  # num_computed_tokens
    token_ids: list[int]  # the new tokens
    block_table: list[int]  # the blocks covering [0, start + len(token_ids))


@dataclass(frozen=True)
class StepPlan:
    TAG: ClassVar[str] = "step_plan"
    chunks: list[PlanChunk] = field(default_factory=list)  # in the scheduler's chunk order
    all_tokens: bool = False  # logits of every new token (prompt logprobs), not only the last


@dataclass(frozen=True)
class Shutdown:
    TAG: ClassVar[str] = "shutdown"
    reason: str = ""


RankMessage = StepPlan | Shutdown

CODEC = MessageCodec(
    (RankLaunch, StepPlan, Shutdown), schema_version=SCHEMA_VERSION, error=TensorParallelError
)


def encode(message: RankLaunch | RankMessage) -> bytes:
    return CODEC.encode(message)


def decode_rank_message(data: bytes) -> RankMessage:
    return typing.cast(RankMessage, CODEC.decode(data, expect=(StepPlan, Shutdown)))


def decode_launch(data: bytes) -> RankLaunch:
    return typing.cast(RankLaunch, CODEC.decode(data, expect=RankLaunch))
