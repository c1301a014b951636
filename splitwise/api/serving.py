"""Request -> backend -> text: what both generation endpoints share.

    check model -> sampling params + context check -> submit -> result stream -> text deltas

The backend is the scheduler's frontend (``FrontendScheduler`` through Redis, or ``LocalFrontend``
in-process); it returns token ids only, so text is made here, per request, with the same
``TextStream`` + ``StopChecker`` the engine uses -- stop strings are cut exactly where the engine
cuts them (the engine also stops generating there, so nothing is wasted).

Context policy (documented in the README's API section):
  * the prompt must leave room for one token: ``prompt_tokens < max_model_len``, else 400;
  * an explicit ``max_tokens`` must fit: ``prompt_tokens + max_tokens <= max_model_len``, else 400;
  * without ``max_tokens``: completions default to 16 tokens, chat to the rest of the context,
    both clipped to the room left.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import Request

from scheduler.errors import NoCapacityError, SchedulerError
from scheduler.messages import Cancelled, Expired, Failed, Finished, ResultMessage, SubmitRequest, TokenChunk
from splitwise.api.errors import (
    ApiError,
    BackendError,
    BadRequestError,
    ClientDisconnectedError,
    ExpiredError,
    NotFoundError,
    UnavailableError,
)
from splitwise.api.metrics import ApiMetrics, RequestTimer
from splitwise.api.protocol import SamplingRequest
from splitwise.api.request_params import GrammarCheck, check_fields, logit_bias_pairs, structured_spec
from splitwise.codes import FailureCode
from splitwise.engine.errors import InvalidRequestError
from splitwise.engine.prompt_logprobs import PromptLogprob
from splitwise.engine.prompt_logprobs import from_wire as prompt_logprobs_from_wire
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.stop_checker import StopChecker
from splitwise.engine.text_stream import TextStream
from splitwise.engine.tokenizer import Tokenizer
from splitwise.logging import get_logger

log = get_logger("splitwise.api")

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy endpoint
MISSING_LOGPROB = -9999.0  # what vLLM reports for a logprob it does not have (JSON has no -inf)
# Failure codes a node reports for a request that can never succeed as sent.
_BAD_REQUEST_CODES = frozenset({FailureCode.INVALID_REQUEST})
_UNAVAILABLE_CODES = frozenset({FailureCode.NO_CAPACITY, FailureCode.NODE_LOST, FailureCode.SCHEDULER_CLOSED})


class FrontendBackend(Protocol):
    """The scheduler frontend as the HTTP layer sees it (FrontendScheduler, LocalFrontend, test doubles).

    Both methods are called from the server's event loop. ``submit`` hands one request to the
    cluster and returns its result stream: token chunks, then exactly one terminal message
    (Finished | Failed | Expired | Cancelled). It raises ``NoCapacityError`` when no prefill/decode
    pair (or mixed node) can take it and ``SchedulerConnectionError`` when Redis is unreachable.
    ``cancel`` is called when the client went away before the terminal message; it tells the nodes
    holding the request to drop it and returns False when the request had already ended.
    """

    async def submit(self, request: SubmitRequest) -> AsyncIterator[ResultMessage]: ...

    async def cancel(self, req_id: str) -> bool: ...


class HasUsage(Protocol):
    """What the outcome log reads (a Generation, or the ChoiceSet of a request)."""

    @property
    def finish_reason(self) -> str | None: ...
    @property
    def num_prompt_tokens(self) -> int: ...
    @property
    def num_completion_tokens(self) -> int: ...


@dataclass(frozen=True)
class TokenPiece:
    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()  # the request's top_logprobs alternatives, most likely first


@dataclass(frozen=True)
class Delta:
    """Text that became final, and the tokens that arrived with it (text and tokens need not align:
    a token may complete a character or a held-back stop-string prefix of an earlier one)."""

    text: str
    tokens: list[TokenPiece] = field(default_factory=list)


@dataclass(frozen=True)
class ServingContext:
    backend: FrontendBackend
    tokenizer: Tokenizer
    model_id: str
    max_model_len: int
    stop_checker: StopChecker
    metrics: ApiMetrics
    grammar: GrammarCheck
    tool_call_parser: str | None = None  # --tool-call-parser: "auto" tool choice parses calls with it
    # A text longer than this cannot fit max_model_len tokens (text_checks.longest_token_chars):
    # it is refused before the tokenizer spends time on it.
    max_prompt_chars: int = 1 << 62

    def request_id(self, request: Request, prefix: str) -> str:
        """``<prefix>-<X-Request-Id>`` when the client sent one (checked), else a random id."""
        given = request.headers.get(REQUEST_ID_HEADER)
        if given is None:
            return f"{prefix}-{uuid.uuid4().hex}"
        if not _REQUEST_ID.fullmatch(given):
            raise BadRequestError(
                f"{REQUEST_ID_HEADER} must be 1-128 characters of [A-Za-z0-9._:-]", param=REQUEST_ID_HEADER
            )
        return f"{prefix}-{given}"

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_id:
            raise NotFoundError(
                f"The model `{model}` does not exist; this server serves `{self.model_id}`",
                param="model",
                code="model_not_found",
            )

    def record_outcome(self, endpoint: str, outcome: str, generation: HasUsage) -> None:
        """Count and log how an accepted request ended (the error boundary does this for the others)."""
        self.metrics.count_request(endpoint, outcome)
        log.info(
            "request_done",
            outcome=outcome,
            finish_reason=generation.finish_reason,
            prompt_tokens=generation.num_prompt_tokens,
            completion_tokens=generation.num_completion_tokens,
        )

    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens included (what logprobs report per token)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def sampling_params(
        self,
        request: SamplingRequest,
        *,
        prompt_tokens: int,
        max_tokens: int | None,
        default_max_tokens: int | None,
        logprobs: bool,
        top_logprobs: int = 0,
        max_tokens_param: str = "max_tokens",
        prompt_param: str = "prompt",
        structured: tuple[str, str, str] | None = None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        """Validated engine parameters, with max_tokens resolved against the context (see module doc).

        ``structured``: a ``(kind, spec, param)`` that overrides the request's own (tool_choice uses it).
        """
        check_fields(request)
        own = structured_spec(request)
        if structured is not None and own is not None:
            raise BadRequestError(
                f"{own[2]} cannot be combined with a tool_choice that constrains the output", param=own[2]
            )
        structured = structured or own
        if structured is not None:
            self.grammar.check(*structured)
        if max_tokens is not None and max_tokens < 1:
            raise BadRequestError(
                f"{max_tokens_param} must be at least 1, got {max_tokens}", param=max_tokens_param
            )
        room = self.max_model_len - prompt_tokens
        if room < 1:
            raise BadRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{prompt_tokens} tokens, leaving no room to generate. Shorten the prompt.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is not None and max_tokens > room:
            raise BadRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                f"completion). Reduce the prompt or {max_tokens_param}.",
                param=max_tokens_param,
                code="context_length_exceeded",
            )
        resolved = max_tokens if max_tokens is not None else min(default_max_tokens or room, room)
        top_k = request.top_k
        try:
            return SamplingParams(
                max_tokens=resolved,
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p,
                top_k=0 if top_k is None or top_k == -1 else top_k,  # vLLM spells "disabled" -1
                seed=request.seed,
                stop=tuple(request.stop_list),
                stop_token_ids=tuple(request.stop_token_ids or ()),
                include_stop_str_in_output=request.include_stop_str_in_output,
                ignore_eos=request.ignore_eos,
                min_tokens=request.min_tokens or 0,
                min_p=request.min_p or 0.0,
                presence_penalty=float(request.presence_penalty or 0.0),
                frequency_penalty=float(request.frequency_penalty or 0.0),
                repetition_penalty=1.0
                if request.repetition_penalty is None
                else float(request.repetition_penalty),
                logit_bias=logit_bias_pairs(request.logit_bias, self.tokenizer.vocab_size),
                allowed_token_ids=tuple(request.allowed_token_ids or ()),
                logprobs=logprobs,
                top_logprobs=top_logprobs,
                prompt_logprobs=prompt_logprobs,
                structured_kind=structured[0] if structured else "",
                structured_spec=structured[1] if structured else "",
            )
        except InvalidRequestError as exc:  # its messages start with the field's name
            name = str(exc).split(" ", 1)[0]
            raise BadRequestError(str(exc), param=name if name in _SAMPLING_FIELDS else None) from None

    def check_token_ids(self, token_ids: Sequence[int], param: str) -> None:
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise BadRequestError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param=param)

    async def start(self, *, req_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Generation:
        """Submit the request; the returned Generation is in flight until its deltas end or it is aborted."""
        timer = RequestTimer(self.metrics)
        request = SubmitRequest(
            req_id=req_id,
            prompt_token_ids=prompt_token_ids,
            sampling_params=params,
            model_id=None,
        )
        try:
            stream = await self.backend.submit(request)
        except NoCapacityError as exc:
            raise UnavailableError(
                f"no prefill/decode pair is available right now: {exc}", code="no_capacity"
            ) from None
        except SchedulerError as exc:
            if exc.retryable:
                raise UnavailableError(
                    f"the scheduler is unavailable: {exc}", code="scheduler_unavailable"
                ) from None
            raise BackendError(f"the scheduler refused the request: {exc}", code="scheduler_error") from None
        self.metrics.requests_in_flight.inc()
        self.metrics.prompt_tokens.inc(len(prompt_token_ids))
        self.metrics.request_prompt_tokens.observe(len(prompt_token_ids))
        log.info("request_submitted", prompt_tokens=len(prompt_token_ids), max_tokens=params.max_tokens)
        return Generation(self, req_id, prompt_token_ids, params, stream, timer)


_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


class Generation:
    """One submitted request: turns its result stream into text deltas and knows how it ended."""

    def __init__(
        self,
        ctx: ServingContext,
        req_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        stream: AsyncIterator[ResultMessage],
        timer: RequestTimer,
    ) -> None:
        self.ctx = ctx
        self.req_id = req_id
        self.params = params
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_completion_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None  # vLLM: the stop string or stop token id that ended it
        self.prompt_logprobs: list[PromptLogprob] | None = None  # echo + logprobs: from the first chunk
        self._last_token_id: int | None = None
        self._stream = stream
        self._text = TextStream(ctx.tokenizer, prompt_token_ids, params)
        self._timer = timer
        self._is_done = False  # the backend holds nothing more for this request
        self._is_closed = False

    async def deltas(self) -> AsyncIterator[Delta]:
        """Text deltas until the request ends; then ``finish_reason`` is set. Raises ApiError when the
        backend reports a failure or expiry (the caller decides how the client hears of it)."""
        async for msg in self._stream:
            if isinstance(msg, TokenChunk):
                delta = self._on_tokens(msg)
                if delta.text or delta.tokens:
                    yield delta
                if self.finish_reason is not None:  # a stop string: the engine stops there too
                    self._end(completed=True)
                    return
                continue
            self._is_done = True
            if not isinstance(msg, Finished):
                self._end(completed=False)
                raise self._error_of(msg)
            self.finish_reason = msg.finish_reason
            if self.stop_reason is None and msg.finish_reason == "stop" and self._last_token_id is not None:
                last = self._last_token_id
                if self._is_stop_token(last) and not self._is_eos(last):
                    self.stop_reason = last
            tail = self._text.finish()
            self._end(completed=True)
            if tail:
                yield Delta(tail)
            return
        self._is_done = True
        self._end(completed=False)
        raise BackendError("the result stream ended without a terminal message", code="stream_ended")

    async def abort(self) -> None:
        """The client is gone: tell the backend (and through it every node holding the request)."""
        self._end(completed=False)
        if self._is_done:
            return
        self._is_done = True
        try:
            cancelled = await self.ctx.backend.cancel(self.req_id)
        except SchedulerError as exc:  # nodes drop it anyway when it expires
            log.warning("cancel_failed", req_id=self.req_id, error=str(exc))
            return
        log.info("request_cancelled", req_id=self.req_id, was_in_flight=cancelled)

    def _is_eos(self, token_id: int) -> bool:
        return not self.params.ignore_eos and token_id in self.ctx.stop_checker.eos_token_ids

    def _is_stop_token(self, token_id: int) -> bool:
        return self._is_eos(token_id) or token_id in self.params.stop_token_ids

    def _on_tokens(self, chunk: TokenChunk) -> Delta:
        if chunk.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = prompt_logprobs_from_wire(
                chunk.prompt_logprobs, chunk.prompt_top_token_ids, chunk.prompt_top_logprobs
            )
        pieces: list[TokenPiece] = []
        text: list[str] = []
        for i, token_id in enumerate(chunk.token_ids):
            logprob = chunk.logprobs[i] if chunk.logprobs is not None and i < len(chunk.logprobs) else None
            top: tuple[tuple[int, float], ...] = ()
            if (
                chunk.top_token_ids is not None
                and chunk.top_logprobs is not None
                and i < len(chunk.top_token_ids)
            ):
                top = tuple(zip(chunk.top_token_ids[i], chunk.top_logprobs[i], strict=True))
            pieces.append(TokenPiece(token_id, logprob, top))
            self._last_token_id = token_id
            # A stop token ends the request (the stop checker guarantees it is the last one); as in
            # vLLM it counts as a completion token but its text is not output unless asked for.
            if self._is_stop_token(token_id) and not self.params.include_stop_str_in_output:
                continue
            pushed = self._text.push(token_id, self.ctx.stop_checker)
            text.append(pushed.text)
            if pushed.stop is not None:
                if self.params.include_stop_str_in_output:
                    text.append(pushed.stop)
                self.finish_reason = "stop"
                self.stop_reason = pushed.stop
                self._is_done = True  # the node stops at the same string by itself
                break
        self.num_completion_tokens += len(pieces)
        self._timer.on_tokens(len(pieces))
        self.ctx.metrics.generation_tokens.inc(len(pieces))
        return Delta("".join(text), pieces)

    def _error_of(self, msg: ResultMessage) -> ApiError:
        if isinstance(msg, Expired):
            return ExpiredError(
                "the request expired before it finished (--scheduler-ttl)", code="request_expired"
            )
        if isinstance(msg, Cancelled):
            return ClientDisconnectedError("the request was cancelled", code="cancelled")
        assert isinstance(msg, Failed)
        log.error(
            "request_failed", req_id=self.req_id, code=msg.code, message=msg.message, retryable=msg.retryable
        )
        if msg.code in _BAD_REQUEST_CODES:
            return BadRequestError(msg.message, code=msg.code)
        if msg.code in _UNAVAILABLE_CODES or msg.retryable:
            return UnavailableError(f"the request could not be served: {msg.message}", code=msg.code)
        return BackendError(f"the request failed on a node: {msg.message}", code=msg.code)

    def _end(self, *, completed: bool) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        self.ctx.metrics.requests_in_flight.dec()
        self._timer.finish(completed=completed)
