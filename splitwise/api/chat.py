"""POST /v1/chat/completions: messages -> the model's chat template -> tokens -> n assistant messages.

Text content parts (``[{"type": "text", "text": ...}]``) are joined into one string, which is what
text-only chat templates expect; any other part type is a 400. ``tools``, ``documents``,
``chat_template_kwargs`` and ``add_generation_prompt`` reach the template; tool calls come back
in ``message.tool_calls`` (splitwise/api/tools.py). Logprobs (``"logprobs": true``) report the
chosen token, and ``top_logprobs: k`` the k most likely tokens per position.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from splitwise.api.body_parse import Body
from splitwise.api.choices import ChoiceEvent, ChoiceSet, expand
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
    DeltaFunctionCall,
    DeltaToolCall,
    ToolCall,
    TopLogprob,
    Usage,
)
from splitwise.api.serving import MISSING_LOGPROB, ServingContext, TokenPiece
from splitwise.api.streaming import collect, respond_streaming, unless_disconnected
from splitwise.api.text_checks import check_length, check_value
from splitwise.api.tools import ToolPlan, ToolStreamFilter, calls_of_constrained, parse_tool_calls, plan_tools
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


def render_chat(
    ctx: ServingContext,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    check_value(messages, "messages")
    for name, value in (
        ("tools", tools),
        ("documents", documents),
        ("chat_template_kwargs", template_kwargs),
    ):
        if value is not None:
            check_value(value, name)
    kwargs: dict[str, Any] = dict(template_kwargs or {})
    for name, value in (("tools", tools), ("documents", documents)):
        if value is not None:
            kwargs[name] = value
    flat = _flatten_content(messages)
    # The rendered text holds every content string: longer ones than max_model_len allows are refused
    # before the template and the tokenizer run.
    contents = sum(len(m["content"]) for m in flat if isinstance(m.get("content"), str))
    check_length(contents, "messages", ctx.max_prompt_chars)
    try:
        text = ctx.tokenizer.apply_chat_template(flat, add_generation_prompt=add_generation_prompt, **kwargs)
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
        top = []
        for token_id, top_logprob in piece.top[:num_top]:
            text = ctx.token_text(token_id)
            top.append(TopLogprob(token=text, logprob=top_logprob, bytes=list(text.encode("utf-8"))))
        content.append(ChatLogprobToken(token=token, logprob=logprob, bytes=raw, top_logprobs=top))
    return ChatLogprobs(content=content)


def _delta_calls(calls: list[ToolCall]) -> list[DeltaToolCall]:
    return [
        DeltaToolCall(
            index=i,
            id=call.id,
            type="function",
            function=DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments),
        )
        for i, call in enumerate(calls)
    ]


class ChatChunks:
    """Stream chunks: the role first, one per delta (per choice), each choice's end, then usage."""

    def __init__(
        self, ctx: ServingContext, choices: ChoiceSet, request: ChatCompletionRequest, plan: ToolPlan
    ) -> None:
        self._ctx, self._choices, self._request, self._plan = ctx, choices, request, plan
        self._tool_text: dict[int, str] = {}  # required / named: the constrained output so far
        self._filters: dict[int, ToolStreamFilter] = {}

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self._choices.req_id, model=self._ctx.model_id, choices=choices, usage=usage
        )

    def opening(self) -> Iterable[ChatCompletionChunk]:
        yield self._chunk(
            [
                ChatChunkChoice(index=s.index, delta=ChatDelta(role="assistant", content=""))
                for s in self._choices.specs
            ]
        )

    def _filter(self, index: int) -> ToolStreamFilter | None:
        if self._plan.mode != "auto" or self._ctx.tool_call_parser is None:
            return None
        return self._filters.setdefault(index, ToolStreamFilter(self._ctx.tool_call_parser))

    def event(self, event: ChoiceEvent) -> Iterable[ChatCompletionChunk]:
        index = event.index
        if event.delta is None:
            yield from self._finish(index)
            return
        logprobs = None
        if self._request.logprobs:
            logprobs = chat_logprobs(self._ctx, event.delta.tokens, self._request.top_logprobs or 0)
        text = event.delta.text
        if self._plan.mode in ("required", "named"):
            self._tool_text[index] = self._tool_text.get(index, "") + text
            text = ""
        elif (f := self._filter(index)) is not None:
            text = f.push(text)
        if text or logprobs is not None:
            yield self._chunk(
                [ChatChunkChoice(index=index, delta=ChatDelta(content=text), logprobs=logprobs)]
            )

    def _finish(self, index: int) -> Iterable[ChatCompletionChunk]:
        generation = self._choices.generations[index]
        calls: list[ToolCall] = []
        if self._plan.mode in ("required", "named"):
            calls = calls_of_constrained(self._plan, self._tool_text.get(index, ""))
        elif (f := self._filter(index)) is not None:
            rest, calls = f.finish()
            if rest:
                yield self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(content=rest))])
        if calls:
            yield self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(tool_calls=_delta_calls(calls)))])
        reason = _finish_reason(self._plan, calls, generation.finish_reason)
        yield self._chunk(
            [
                ChatChunkChoice(
                    index=index, delta=ChatDelta(), finish_reason=reason, stop_reason=generation.stop_reason
                )
            ]
        )

    def closing(self, choices: ChoiceSet) -> Iterable[ChatCompletionChunk]:
        if self._request.include_usage:
            yield self._chunk([], Usage.of(choices.num_prompt_tokens, choices.num_completion_tokens))


def _finish_reason(plan: ToolPlan, calls: list[ToolCall], reason: str | None) -> str | None:
    """OpenAI: "tool_calls" when the model chose to call (auto, required); a forced call is "stop"."""
    return "tool_calls" if calls and reason == "stop" and plan.mode != "named" else reason


def _message(ctx: ServingContext, plan: ToolPlan, text: str) -> ChatMessage:
    if plan.mode in ("required", "named"):
        calls = calls_of_constrained(plan, text)
        return ChatMessage(content=None if calls else text, tool_calls=calls)
    if plan.mode == "auto" and ctx.tool_call_parser is not None:
        content, calls = parse_tool_calls(ctx.tool_call_parser, text)
        return ChatMessage(content=content, tool_calls=calls)
    return ChatMessage(content=text)


async def create_chat_completion(
    ctx: ServingContext, request: Request, body: ChatCompletionRequest, raw: Body | None = None
) -> Response:
    ctx.check_model(body.model)
    req_id = ctx.request_id(request, "chatcmpl")
    with bind_request(req_id):
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        if body.continue_final_message:
            raise BadRequestError("continue_final_message is not supported", param="continue_final_message")
        plan = plan_tools(body, ctx.tool_call_parser)
        ids = await (raw or Body(is_large=False)).off_loop(
            lambda: render_chat(
                ctx,
                body.messages,
                add_generation_prompt=body.add_generation_prompt,
                tools=body.tools,
                documents=body.documents,
                template_kwargs=body.chat_template_kwargs,
            )
        )
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
            top_logprobs=body.top_logprobs or 0 if body.logprobs else 0,
            structured=plan.structured,
        )
        specs = expand([ids], [params], body.n)
        choices = ChoiceSet(ctx, req_id, specs)
        await choices.start()
        if body.stream:
            return await respond_streaming(request, choices, ChatChunks(ctx, choices, body, plan), ENDPOINT)
        events = await unless_disconnected(request, collect(choices), choices)
        out = []
        for spec in specs:
            mine = [e.delta for e in events if e.index == spec.index and e.delta is not None]
            pieces = [piece for delta in mine for piece in delta.tokens]
            generation = choices.generations[spec.index]
            message = _message(ctx, plan, "".join(d.text for d in mine))
            reason = generation.finish_reason
            out.append(
                ChatChoice(
                    index=spec.index,
                    message=message,
                    logprobs=chat_logprobs(ctx, pieces, body.top_logprobs or 0) if body.logprobs else None,
                    finish_reason=_finish_reason(plan, message.tool_calls, reason),
                    stop_reason=generation.stop_reason,
                )
            )
        response = ChatCompletionResponse(
            id=req_id,
            model=ctx.model_id,
            choices=out,
            usage=Usage.of(choices.num_prompt_tokens, choices.num_completion_tokens),
        )
        ctx.record_outcome(ENDPOINT, "success", choices)
        return JSONResponse(response.model_dump())
