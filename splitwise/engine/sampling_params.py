"""Per-request sampling parameters: frozen and validated at construction.

The dataclass is also the wire form between processes: ``splitwise.wire_codec`` carries it as a
map of its fields inside WorkItem (scheduler) and PrefillTask (P<->D control channel), rebuilding
tuples and re-running this validation on decode, so there is no converter to keep in step. Sequence
fields are normalised to tuples here so a caller may pass lists.
"""

from __future__ import annotations

from dataclasses import dataclass

from splitwise.engine.errors import InvalidRequestError

# Structured-output kinds (splitwise/engine/guided): what ``structured_spec`` holds for each.
STRUCTURED_KINDS = frozenset({"json", "json_object", "regex", "choice", "grammar"})
MAX_TOP_LOGPROBS = 20
_TUPLE_FIELDS = ("stop", "stop_token_ids", "allowed_token_ids")


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of the sampler.

    temperature 0 means greedy. ``seed`` makes sampling reproducible per request regardless of
    what else is in the batch (each request owns its own torch.Generator).

    Logits processing, in vLLM's order: allowed_token_ids, structured-output mask, min_tokens
    (stop tokens masked), logit_bias, repetition/frequency/presence penalties, then temperature,
    min_p, top-k and top-p. Reported logprobs are always of the model's raw distribution.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    min_p: float = 0.0  # 0: disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0  # eos and stop_token_ids are masked until this many tokens exist
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] = ()  # empty: every token
    logprobs: bool = False  # report the chosen token's logprob (always computed; this only controls output)
    top_logprobs: int = 0  # alternatives reported per position (vLLM's ``logprobs: k``)
    prompt_logprobs: int | None = None  # None: off; k: each prompt token's logprob and k alternatives
    structured_kind: str = ""  # "" (none) or one of STRUCTURED_KINDS
    structured_spec: str = ""  # JSON schema text, regex, JSON list of choices, or EBNF grammar

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if not isinstance(self.logit_bias, tuple) or any(not isinstance(p, tuple) for p in self.logit_bias):
            object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 2.0:
            raise InvalidRequestError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if any(not -100.0 <= b <= 100.0 for _, b in self.logit_bias):
            raise InvalidRequestError("logit_bias values must be in [-100, 100]")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"
            )
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(
                f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs}"
            )
        if self.structured_kind and self.structured_kind not in STRUCTURED_KINDS:
            raise InvalidRequestError(
                f"structured_kind {self.structured_kind!r} is not one of {sorted(STRUCTURED_KINDS)}"
            )

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def needs_processing(self) -> bool:
        """Whether any logits processing beyond temperature / top-k / top-p applies."""
        return bool(
            self.has_penalties or self.logit_bias or self.allowed_token_ids or self.min_tokens or self.min_p
        )
