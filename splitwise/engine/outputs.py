"""What the engine hands back per request per step."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitwise.engine.sequence import FinishReason


@dataclass(frozen=True)
class RequestOutput:
    """The delta one step produced for one request.

    ``new_text`` is final text (never retracted): with stop strings the engine holds back the
    last ``len(longest stop) - 1`` characters until it knows they are not the start of a stop
    string. ``finish_reason`` is set exactly once, on the request's last output; ``error`` is set
    when the engine could not serve the request (then ``finish_reason`` is ABORT).
    """

    req_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[float] = field(default_factory=list)
    # Per new token: its request's top_logprobs most likely (token id, logprob); [] when not asked for.
    new_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # On a request's first output, when it asked for prompt_logprobs: per prompt token after the
    # first, (logprob, top alternatives) -- splitwise/engine/prompt_logprobs.py.
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    new_text: str = ""
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    stop_text: str | None = None  # the stop string that ended the request
    error: str | None = None
    # Prefill-only requests (PREFILL_DONE): the blocks holding the prompt's KV, for the transfer.
    block_ids: tuple[int, ...] = ()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class GenerationResult:
    """A whole finished request (offline ``LLMEngine.generate``)."""

    req_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: FinishReason
    num_cached_tokens: int = 0
    error: str | None = None
