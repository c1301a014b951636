"""POST /v1/chat/completions through the official openai client against the real server."""

from __future__ import annotations

import openai
import pytest
from api_support import MAX_MODEL_LEN, MODEL_ID, SCRIPT_TEXT, LocalStack
from openai.types.chat import ChatCompletionChunk

from splitwise.engine.tokenizer import Tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]


@pytest.fixture()
def client(local_stack: LocalStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=local_stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=20)


def chat_prompt(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode(
        tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True), add_special_tokens=False
    )


def test_chat_uses_the_template_and_answers(
    client: openai.OpenAI, local_stack: LocalStack, tokenizer: Tokenizer
) -> None:
    out = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=6)  # type: ignore[arg-type]
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    script = tokenizer.encode(SCRIPT_TEXT, add_special_tokens=False)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == tokenizer.decode(script[:6])
    assert out.choices[0].finish_reason == "length"
    submitted = next(r for r in local_stack.backend.submitted if r.req_id == out.id)
    assert submitted.prompt_token_ids == chat_prompt(tokenizer)
    assert out.usage is not None and out.usage.prompt_tokens == len(chat_prompt(tokenizer))
    assert out.usage.completion_tokens == 6 and out.usage.total_tokens == out.usage.prompt_tokens + 6


def test_chat_default_max_tokens_is_the_rest_of_the_context(
    client: openai.OpenAI, local_stack: LocalStack, tokenizer: Tokenizer
) -> None:
    out = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES)  # type: ignore[arg-type]
    params = next(r for r in local_stack.backend.submitted if r.req_id == out.id).sampling_params
    assert params.max_tokens == MAX_MODEL_LEN - len(chat_prompt(tokenizer))
    assert out.choices[0].message.content == SCRIPT_TEXT  # the node ran out of script: eos
    assert out.choices[0].finish_reason == "stop"


def test_max_completion_tokens_wins(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL_ID,
        messages=MESSAGES,
        max_tokens=9,  # type: ignore[arg-type]
        max_completion_tokens=2,
    )
    assert out.usage is not None and out.usage.completion_tokens == 2


def test_chat_stop_string(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, stop=["jumps"])  # type: ignore[arg-type]
    assert out.choices[0].message.content == SCRIPT_TEXT.split("jumps")[0]
    assert out.choices[0].finish_reason == "stop"


def test_text_content_parts_are_joined(
    client: openai.OpenAI, local_stack: LocalStack, tokenizer: Tokenizer
) -> None:
    parts = [
        {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        MESSAGES[1],
    ]
    out = client.chat.completions.create(model=MODEL_ID, messages=parts, max_tokens=1)  # type: ignore[arg-type]
    assert next(
        r for r in local_stack.backend.submitted if r.req_id == out.id
    ).prompt_token_ids == chat_prompt(tokenizer)


def test_chat_logprobs(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    out = client.chat.completions.create(
        model=MODEL_ID,
        messages=MESSAGES,
        max_tokens=3,  # type: ignore[arg-type]
        logprobs=True,
        top_logprobs=1,
    )
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 3
    script = tokenizer.encode(SCRIPT_TEXT, add_special_tokens=False)
    for i, entry in enumerate(content):
        token = tokenizer.decode([script[i]], skip_special_tokens=False)
        assert entry.token == token and entry.bytes == list(token.encode())
        assert entry.logprob == pytest.approx(-(i + 1) / 10)
        assert [(t.token, t.logprob) for t in entry.top_logprobs] == [(token, pytest.approx(entry.logprob))]


def test_no_logprobs_unless_asked(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    assert out.choices[0].logprobs is None


def test_chat_streaming(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=7)  # type: ignore[arg-type]
    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID,
            messages=MESSAGES,
            max_tokens=7,  # type: ignore
            stream=True,
            stream_options={"include_usage": True},
            logprobs=True,
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id.startswith("chatcmpl-") for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == whole.choices[0].message.content
    assert with_choices[-1].choices[0].finish_reason == "length"
    streamed_logprobs = [
        e.logprob for c in with_choices if c.choices[0].logprobs for e in c.choices[0].logprobs.content or []
    ]
    assert streamed_logprobs == pytest.approx([-(i + 1) / 10 for i in range(7)])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 7
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens  # type: ignore[union-attr]


def test_streaming_without_include_usage_sends_no_usage(client: openai.OpenAI) -> None:
    chunks: list[ChatCompletionChunk] = list(
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=2, stream=True)
    )  # type: ignore[arg-type]
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
