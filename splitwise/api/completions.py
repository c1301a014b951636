"""POST /v1/completions: one prompt (text or token ids) -> text, streamed or whole.

Logprobs (``"logprobs": N``) report the chosen token only -- the engine computes nothing else -- so
``top_logprobs`` holds one entry per position whatever N is. ``text_offset`` counts characters of
the per-token strings, as vLLM does.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from splitwise.api.errors import BadRequestError
from splitwise.api.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptInput,
    Usage,
)
from splitwise.api.serving import COMPLETION_DEFAULT_MAX_TOKENS, Delta, Generation, ServingContext, TokenPiece
from splitwise.api.streaming import collect, respond_streaming, unless_disconnected
from splitwise.logging import bind_request

ENDPOINT = "/v1/completions"


def prompt_token_ids(ctx: ServingContext, prompt: PromptInput) -> list[int]:
    """The one prompt of a request as token ids ([text] and [[ids]] unwrap; several prompts are a 400)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise BadRequestError(
                f"one prompt per request is supported, got {len(prompt)}; send them separately",
                param="prompt",
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = ctx.tokenizer.encode(prompt)
    else:
        ids = [int(t) for t in prompt]  # type: ignore[arg-type]
        ctx.check_token_ids(ids, "prompt")
    if not ids:
        raise BadRequestError("prompt is empty", param="prompt")
    return ids


class CompletionLogprobsBuilder:
    def __init__(self, ctx: ServingContext) -> None:
        self._ctx = ctx
        self._offset = 0

    def build(self, pieces: list[TokenPiece]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for piece in pieces:
            token = self._ctx.token_text(piece.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(piece.logprob)
            out.text_offset.append(self._offset)
            out.top_logprobs.append({token: piece.logprob} if piece.logprob is not None else None)
            self._offset += len(token)
        return out


class CompletionChunks:
    """Stream chunks: one per delta, a final one with finish_reason, then usage if asked for."""

    def __init__(self, ctx: ServingContext, req_id: str, request: CompletionRequest) -> None:
        self._ctx, self._req_id, self._request = ctx, req_id, request
        self._logprobs = CompletionLogprobsBuilder(ctx) if request.logprobs is not None else None

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=self._req_id, model=self._ctx.model_id, choices=choices, usage=usage)

    def opening(self) -> Iterable[CompletionResponse]:
        return ()

    def delta(self, delta: Delta) -> Iterable[CompletionResponse]:
        logprobs = self._logprobs.build(delta.tokens) if self._logprobs is not None else None
        yield self._chunk([CompletionChoice(text=delta.text, logprobs=logprobs)])

    def closing(self, generation: Generation) -> Iterable[CompletionResponse]:
        yield self._chunk([CompletionChoice(text="", finish_reason=generation.finish_reason)])
        if self._request.include_usage:
            yield self._chunk([], Usage.of(generation.num_prompt_tokens, generation.num_completion_tokens))


async def create_completion(ctx: ServingContext, request: Request, body: CompletionRequest) -> Response:
    ctx.check_model(body.model)
    if body.echo:
        raise BadRequestError("echo is not supported", param="echo")
    ids = prompt_token_ids(ctx, body.prompt)
    params = ctx.sampling_params(
        body,
        prompt_tokens=len(ids),
        max_tokens=body.max_tokens,
        default_max_tokens=COMPLETION_DEFAULT_MAX_TOKENS,
        logprobs=body.logprobs is not None,
    )
    req_id = f"cmpl-{uuid.uuid4().hex}"
    with bind_request(req_id):
        generation = await ctx.start(req_id=req_id, prompt_token_ids=ids, params=params)
        if body.stream:
            return await respond_streaming(request, generation, CompletionChunks(ctx, req_id, body), ENDPOINT)
        deltas = await unless_disconnected(request, collect(generation), generation)
        pieces = [piece for delta in deltas for piece in delta.tokens]
        logprobs = CompletionLogprobsBuilder(ctx).build(pieces) if body.logprobs is not None else None
        choice = CompletionChoice(
            text="".join(d.text for d in deltas), logprobs=logprobs, finish_reason=generation.finish_reason
        )
        response = CompletionResponse(
            id=req_id,
            model=ctx.model_id,
            choices=[choice],
            usage=Usage.of(generation.num_prompt_tokens, generation.num_completion_tokens),
        )
        ctx.record_outcome(ENDPOINT, "success", generation)
        return JSONResponse(response.model_dump())
