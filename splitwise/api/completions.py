"""POST /v1/completions: one prompt or a batch (text or token ids) -> n choices each, streamed or whole.

Logprobs (``"logprobs": k``) report the chosen token and the k most likely ones per position (in
``top_logprobs``, the chosen one included, as vLLM). ``text_offset`` counts characters of the
per-token strings, as vLLM does. ``echo`` puts the prompt text in front of each choice's text;
with logprobs the prompt tokens come first in the logprobs too (the first one with ``None``),
computed on the node that prefilled (splitwise/engine/prompt_logprobs.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from splitwise.api.body_parse import Body
from splitwise.api.choices import ChoiceEvent, ChoiceSet, expand
from splitwise.api.errors import BadRequestError
from splitwise.api.protocol import (
    MAX_PROMPTS,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptInput,
    Usage,
)
from splitwise.api.serving import COMPLETION_DEFAULT_MAX_TOKENS, ServingContext, TokenPiece
from splitwise.api.streaming import collect, respond_streaming, unless_disconnected
from splitwise.api.text_checks import check_text
from splitwise.engine.prompt_logprobs import PromptLogprob
from splitwise.logging import bind_request

ENDPOINT = "/v1/completions"


def prompt_list(ctx: ServingContext, prompt: PromptInput) -> list[tuple[list[int], str | None]]:
    """Every prompt of a request as token ids (and its text, when sent as text): a string, a list
    of ids, or a batch of either."""
    batch: list[str | list[int]]
    if isinstance(prompt, str):
        batch = [prompt]
    elif prompt and isinstance(prompt[0], (str, list)):
        batch = list(prompt)
    else:
        batch = [prompt]  # type: ignore[list-item]
    if not batch:
        raise BadRequestError("prompt is empty", param="prompt")
    if len(batch) > MAX_PROMPTS:
        raise BadRequestError(f"at most {MAX_PROMPTS} prompts per request, got {len(batch)}", param="prompt")
    out = []
    for i, one in enumerate(batch):
        param = "prompt" if len(batch) == 1 else f"prompt[{i}]"
        if isinstance(one, str):
            check_text(one, param, max_chars=ctx.max_prompt_chars)
            ids = ctx.tokenizer.encode(one) if one else []
        else:
            ids = [int(t) for t in one]
            ctx.check_token_ids(ids, param)
        if not ids or not (isinstance(one, list) or one):
            raise BadRequestError("prompt is empty", param=param)
        out.append((ids, one if isinstance(one, str) else None))
    return out


class CompletionLogprobsBuilder:
    def __init__(self, ctx: ServingContext) -> None:
        self._ctx = ctx
        self._offset = 0

    def build_prompt(
        self, prompt_token_ids: list[int], values: list[PromptLogprob] | None
    ) -> CompletionLogprobs:
        """The prompt's tokens: the first without a logprob, then each with its alternatives."""
        known: list[PromptLogprob | None] = list(values or [])
        scored = [None, *known] + [None] * (len(prompt_token_ids) - 1 - len(known))
        out = CompletionLogprobs()
        for token_id, value in zip(prompt_token_ids, scored, strict=True):
            token = self._ctx.token_text(token_id)
            out.tokens.append(token)
            out.text_offset.append(self._offset)
            self._offset += len(token)
            if value is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            logprob, top = value
            out.token_logprobs.append(logprob)
            entries = {token: logprob}
            for alt_id, alt_logprob in top:
                entries.setdefault(self._ctx.token_text(alt_id), alt_logprob)
            out.top_logprobs.append(entries)
        return out

    def build(self, pieces: list[TokenPiece]) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for piece in pieces:
            token = self._ctx.token_text(piece.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(piece.logprob)
            out.text_offset.append(self._offset)
            if piece.logprob is None:
                out.top_logprobs.append(None)
            else:
                top = {token: piece.logprob}
                for token_id, logprob in piece.top:
                    top.setdefault(self._ctx.token_text(token_id), logprob)
                out.top_logprobs.append(top)
            self._offset += len(token)
        return out


class CompletionChunks:
    """Stream chunks: one per delta (per choice), one with each choice's finish_reason, then usage."""

    def __init__(
        self, ctx: ServingContext, choices: ChoiceSet, request: CompletionRequest, echoes: list[str]
    ) -> None:
        self._ctx, self._req_id, self._request, self._choices = ctx, choices.req_id, request, choices
        self._echoes = echoes  # per choice: the prompt text still to send (echo)
        self._logprobs: dict[int, CompletionLogprobsBuilder] = {}
        self._prompt_sent: set[int] = set()  # choices whose prompt logprobs went out (echo)

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(id=self._req_id, model=self._ctx.model_id, choices=choices, usage=usage)

    def opening(self) -> Iterable[CompletionResponse]:
        return ()

    def event(self, event: ChoiceEvent) -> Iterable[CompletionResponse]:
        echo, self._echoes[event.index] = self._echoes[event.index], ""
        if event.delta is None:
            if echo:
                yield self._chunk([CompletionChoice(index=event.index, text=echo)])
            yield self._finish_chunk(event.index)
            return
        logprobs = None
        if self._request.logprobs is not None:
            builder = self._logprobs.setdefault(event.index, CompletionLogprobsBuilder(self._ctx))
            prompt = None
            if self._request.echo and event.index not in self._prompt_sent:
                self._prompt_sent.add(event.index)
                spec = self._choices.specs[event.index]
                generation = self._choices.generations[event.index]
                prompt = builder.build_prompt(spec.prompt_token_ids, generation.prompt_logprobs)
            logprobs = _joined(prompt, builder.build(event.delta.tokens))
        yield self._chunk(
            [CompletionChoice(index=event.index, text=echo + event.delta.text, logprobs=logprobs)]
        )

    def _finish_chunk(self, index: int) -> CompletionResponse:
        generation = self._choices.generations[index]
        choice = CompletionChoice(
            index=index, text="", finish_reason=generation.finish_reason, stop_reason=generation.stop_reason
        )
        return self._chunk([choice])

    def closing(self, choices: ChoiceSet) -> Iterable[CompletionResponse]:
        if self._request.include_usage:
            yield self._chunk([], Usage.of(choices.num_prompt_tokens, choices.num_completion_tokens))


def _joined(first: CompletionLogprobs | None, second: CompletionLogprobs) -> CompletionLogprobs:
    if first is None:
        return second
    return CompletionLogprobs(
        tokens=first.tokens + second.tokens,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        text_offset=first.text_offset + second.text_offset,
        top_logprobs=first.top_logprobs + second.top_logprobs,
    )


async def create_completion(
    ctx: ServingContext, request: Request, body: CompletionRequest, raw: Body | None = None
) -> Response:
    ctx.check_model(body.model)
    req_id = ctx.request_id(request, "cmpl")
    with bind_request(req_id):
        raw = raw or Body(is_large=False)
        prompt_texts = await raw.off_loop(lambda: prompt_list(ctx, body.prompt))  # tokenizes
        prompts = [ids for ids, _ in prompt_texts]
        top = body.logprobs or 0
        params = [
            ctx.sampling_params(
                body,
                prompt_tokens=len(ids),
                max_tokens=body.max_tokens,
                default_max_tokens=COMPLETION_DEFAULT_MAX_TOKENS,
                logprobs=body.logprobs is not None,
                top_logprobs=top,
                prompt_logprobs=top if body.echo and body.logprobs is not None else None,
                prompt_param="prompt" if len(prompts) == 1 else f"prompt[{i}]",
            )
            for i, ids in enumerate(prompts)
        ]
        specs = expand(prompts, params, body.n)
        # echo: the prompt as sent (text prompts), or the decoded ids
        echoes = [
            (prompt_texts[s.group][1] or ctx.tokenizer.decode(s.prompt_token_ids)) if body.echo else ""
            for s in specs
        ]
        choices = ChoiceSet(ctx, req_id, specs)
        await choices.start()
        if body.stream:
            formatter = CompletionChunks(ctx, choices, body, echoes)
            return await respond_streaming(request, choices, formatter, ENDPOINT)
        events = await unless_disconnected(request, collect(choices), choices)
        out = []
        for spec, echo in zip(specs, echoes, strict=True):
            mine = [e.delta for e in events if e.index == spec.index and e.delta is not None]
            pieces = [piece for delta in mine for piece in delta.tokens]
            generation = choices.generations[spec.index]
            logprobs = None
            if body.logprobs is not None:
                builder = CompletionLogprobsBuilder(ctx)
                prompt = (
                    builder.build_prompt(spec.prompt_token_ids, generation.prompt_logprobs) if echo else None
                )
                logprobs = _joined(prompt, builder.build(pieces))
            out.append(
                CompletionChoice(
                    index=spec.index,
                    text=echo + "".join(d.text for d in mine),
                    logprobs=logprobs,
                    finish_reason=generation.finish_reason,
                    stop_reason=generation.stop_reason,
                )
            )
        response = CompletionResponse(
            id=req_id,
            model=ctx.model_id,
            choices=out,
            usage=Usage.of(choices.num_prompt_tokens, choices.num_completion_tokens),
        )
        ctx.record_outcome(ENDPOINT, "success", choices)
        return JSONResponse(response.model_dump())
