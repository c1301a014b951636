"""The decode side's per-request record, the engine-worker surface the decode flow needs, and the
errors the flow raises (split from decode_flow.py to keep it small; re-exported there)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

from scheduler.messages import WorkItem
from splitwise import codes
from splitwise.engine.errors import EngineError, InvalidRequestError
from splitwise.engine.outputs import RequestOutput
from splitwise.engine.sampling_params import SamplingParams
from splitwise.errors import SplitwiseError
from splitwise.instance.engine_worker import PrefilledFirst
from splitwise.instance.handoff_state import DecodeState, Record
from splitwise.instance.pd_channel import Connection
from splitwise.transfer.messages import PrefillResult


class PrefillUnavailable(SplitwiseError):
    """The remote prefill did not produce usable KV (P lost, refused, failed, or transfer failed)."""

    retryable = True


class PromptTooLargeError(InvalidRequestError):
    """The prompt cannot fit this decode node's whole KV cache, however long it waits (HTTP 400:
    like a prompt past max_model_len, no retry can help)."""

    retryable = False


class DecodeCapacityError(EngineError):
    """Too many requests already wait for KV blocks on this decode node."""

    retryable = True


class DecodeWorker(Protocol):
    """What the decode flow needs of the engine worker (``EngineWorker``; a fake in tests)."""

    block_size: int
    num_kv_blocks: int

    async def validate_prompt(self, req_id: str, prompt_token_ids: list[int]) -> None: ...
    async def cached_prefix_tokens(self, prompt_token_ids: list[int]) -> int: ...
    async def reserve(self, req_id: str, num_tokens: int) -> list[int]: ...
    async def reserve_reusing(
        self, req_id: str, prompt_token_ids: list[int], num_tokens: int
    ) -> tuple[list[int], int]: ...
    async def release_reservation(self, req_id: str) -> None: ...
    async def admit_prefilled(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        first: PrefilledFirst,
        reservation_id: str | None = None,
    ) -> asyncio.Queue[RequestOutput]: ...
    def submit(
        self, req_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> asyncio.Queue[RequestOutput]: ...


@dataclass
class DecodeRecord(Record[DecodeState]):
    """``handoff`` (``messages.handoff_id``: req_id and attempt) keys everything of this attempt
    that outlives a retry: the flow's records, the KV reservation, the target's expect/forget and
    the messages to P. ``req_id`` stays the request's: the engine runs (or falls back) under it."""

    handoff: str = ""
    item: WorkItem | None = None
    prompt: list[int] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)
    protocol: codes.Protocol = codes.Protocol.TCP
    block_ids: list[int] = field(default_factory=list)
    num_reused_blocks: int = 0  # leading block_ids from D's prefix cache: P ships none of them
    started_s: float = 0.0
    conn: Connection | None = None
    result: PrefillResult | None = None
    # Resolved by the transition that ends PREFILLING (whatever caused it): the driver wakes up.
    prefill_ended: asyncio.Future[None] | None = None
    local_outputs: asyncio.Queue[RequestOutput] | None = None  # FALLING_BACK: the local request
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set once the record is forgotten
