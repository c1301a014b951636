"""POST /v1/chat/completions: messages -> the model's chat template -> tokens -> an assistant message.

Text content parts (``[{"type": "text", "text": ...}]``) are joined into one string, which is what
text-only chat templates expect; any other part type is a 400. Logprobs (``"logprobs": true``)
report the chosen token; ``top_logprobs`` lists it alone when asked for (the engine computes no others).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from splitwise.api.errors import BadRequestError
from splitwise.api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatLogprobToken,
    ChatMessage,
    TopLogprob,
    Usage,
)
from splitwise.api.serving import MISSING_LOGPROB, Delta, Generation, ServingContext, TokenPiece
from splitwise.api.streaming import collect, respond_streaming, unless_disconnected
from splitwise.engine.errors import InvalidRequestError
from splitwise.logging import bind_request

ENDPOINT = "/v1/chat/completions"


def _flatten_content(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise BadRequestError(
                        "only text content parts ({'type': 'text', 'text': ...}) are supported",
                        param=f"messages[{i}].content[{j}]",
                    )
                texts.append(part["text"])
            message = {**message, "content": "".join(texts)}
        out.append(message)
    return out


def chat_prompt_token_ids(ctx: ServingContext, messages: list[dict[str, Any]]) -> list[int]:
    try:
        text = ctx.tokenizer.apply_chat_template(_flatten_content(messages), add_generation_prompt=True)
    except InvalidRequestError as exc:  # the template (or the tokenizer's checks) rejected the messages
        raise BadRequestError(str(exc), param="messages") from None
    # The template writes its own special tokens (bos included, if the model wants one).
    return ctx.tokenizer.encode(text, add_special_tokens=False)


def chat_logprobs(ctx: ServingContext, pieces: list[TokenPiece], num_top: int) -> ChatLogprobs:
    content = []
    for piece in pieces:
        token = ctx.token_text(piece.token_id)
        logprob = piece.logprob if piece.logprob is not None else MISSING_LOGPROB
        raw = list(token.encode("utf-8"))
        top = [TopLogprob(token=token, logprob=logprob, bytes=raw)] if num_top > 0 else []
        content.append(ChatLogprobToken(token=token, logprob=logprob, bytes=raw, top_logprobs=top))
    return ChatLogprobs(content=content)


class ChatChunks:
    """Stream chunks: the role first, one per delta, a final one with finish_reason, then usage."""

    def __init__(self, ctx: ServingContext, req_id: str, request: ChatCompletionRequest) -> None:
        self._ctx, self._req_id, self._request = ctx, req_id, request

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self._req_id, model=self._ctx.model_id, choices=choices, usage=usage)

    def opening(self) -> Iterable[ChatCompletionChunk]:
        yield self._chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])

    def delta(self, delta: Delta) -> Iterable[ChatCompletionChunk]:
        logprobs = None
        if self._request.logprobs:
            logprobs = chat_logprobs(self._ctx, delta.tokens, self._request.top_logprobs or 0)
        yield self._chunk([ChatChunkChoice(delta=ChatDelta(content=delta.text), logprobs=logprobs)])

    def closing(self, generation: Generation) -> Iterable[ChatCompletionChunk]:
        yield self._chunk([ChatChunkChoice(delta=ChatDelta(), finish_reason=generation.finish_reason)])
        if self._request.include_usage:
            yield self._chunk([], Usage.of(generation.num_prompt_tokens, generation.num_completion_tokens))


async def create_chat_completion(
    ctx: ServingContext, request: Request, body: ChatCompletionRequest
) -> Response:
    ctx.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    ids = chat_prompt_token_ids(ctx, body.messages)
    # max_completion_tokens replaced max_tokens in OpenAI's API; either works, the new one wins.
    use_new = body.max_completion_tokens is not None
    params = ctx.sampling_params(
        body,
        prompt_tokens=len(ids),
        max_tokens=body.max_completion_tokens if use_new else body.max_tokens,
        max_tokens_param="max_completion_tokens" if use_new else "max_tokens",
        prompt_param="messages",
        default_max_tokens=None,
        logprobs=body.logprobs,
    )
    req_id = f"chatcmpl-{uuid.uuid4().hex}"
    with bind_request(req_id):
        generation = await ctx.start(req_id=req_id, prompt_token_ids=ids, params=params)
        if body.stream:
            return await respond_streaming(request, generation, ChatChunks(ctx, req_id, body), ENDPOINT)
        deltas = await unless_disconnected(request, collect(generation), generation)
        pieces = [piece for delta in deltas for piece in delta.tokens]
        logprobs = chat_logprobs(ctx, pieces, body.top_logprobs or 0) if body.logprobs else None
        choice = ChatChoice(
            message=ChatMessage(content="".join(d.text for d in deltas)),
            logprobs=logprobs,
            finish_reason=generation.finish_reason,
        )
        response = ChatCompletionResponse(
            id=req_id,
            model=ctx.model_id,
            choices=[choice],
            usage=Usage.of(generation.num_prompt_tokens, generation.num_completion_tokens),
        )
        ctx.record_outcome(ENDPOINT, "success", generation)
        return JSONResponse(response.model_dump())
