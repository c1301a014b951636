"""A request's state inside one engine: tokens, progress, blocks, outcome."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from splitwise.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # admitted to the engine, no KV yet (or preempted: KV dropped, recompute)
    RUNNING = "running"  # has blocks; prefilling (chunk by chunk) or decoding
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, stop token id or stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"  # cancelled by the caller
    PREFILL_DONE = "prefill_done"  # prefill-only request: first token produced, KV kept for transfer


@dataclass
class Sequence:
    """Mutable per-request state. Owned by the engine; callers read it via RequestOutput.

    Token bookkeeping::

        token_ids = prompt_token_ids + output_token_ids
        |<------------- num_computed_tokens ------------->|<- to compute ->|
        |<- num_cached_tokens (prefix-cache hit) ->|
    """

    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_s: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (last admission)
    num_preemptions: int = 0
    prefill_only: bool = False  # stop after the first token, keep the blocks (disaggregated prefill)
    stop_text: str | None = None  # the stop string that ended the request, if any

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV is not written yet. 1 while decoding (the last sampled token)."""
        return self.num_tokens - self.num_computed_tokens
