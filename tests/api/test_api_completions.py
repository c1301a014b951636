"""POST /v1/completions through the official openai client against the real server."""

from __future__ import annotations

import httpx
import openai
import pytest
from api_support import MODEL_ID, SCRIPT_TEXT, LocalStack

from splitwise.engine.tokenizer import Tokenizer


@pytest.fixture()
def client(local_stack: LocalStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=local_stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=20)


def script_ids(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode(SCRIPT_TEXT, add_special_tokens=False)


def test_completion_text_usage_and_finish_reason(
    client: openai.OpenAI, local_stack: LocalStack, tokenizer: Tokenizer
) -> None:
    out = client.completions.create(model=MODEL_ID, prompt="Say hi", max_tokens=5)
    assert out.id.startswith("cmpl-")
    assert out.model == MODEL_ID
    assert out.choices[0].text == tokenizer.decode(script_ids(tokenizer)[:5])
    assert out.choices[0].finish_reason == "length"
    prompt_tokens = len(tokenizer.encode("Say hi"))
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        prompt_tokens,
        5,
        prompt_tokens + 5,
    )
    submitted = next(r for r in local_stack.backend.submitted if r.req_id == out.id)
    assert submitted.prompt_token_ids == tokenizer.encode("Say hi")
    assert submitted.sampling_params.max_tokens == 5


def test_token_id_prompt_is_used_as_is(client: openai.OpenAI, local_stack: LocalStack) -> None:
    out = client.completions.create(model=MODEL_ID, prompt=[5, 6, 7, 8], max_tokens=2)
    assert out.usage is not None and out.usage.prompt_tokens == 4
    submitted = next(r for r in local_stack.backend.submitted if r.req_id == out.id)
    assert submitted.prompt_token_ids == [5, 6, 7, 8]


def test_sampling_fields_reach_the_backend(client: openai.OpenAI, local_stack: LocalStack) -> None:
    out = client.completions.create(
        model=MODEL_ID,
        prompt="x",
        max_tokens=3,
        temperature=0.5,
        top_p=0.9,
        seed=1234,
        stop=["zzz", "qqq"],
        extra_body={"top_k": 7, "ignore_eos": True},
    )
    params = next(r for r in local_stack.backend.submitted if r.req_id == out.id).sampling_params
    assert params.temperature == 0.5 and params.top_p == 0.9 and params.top_k == 7
    assert params.seed == 1234 and list(params.stop) == ["zzz", "qqq"] and params.ignore_eos is True
    assert params.logprobs is False


def test_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL_ID, prompt="x")
    assert out.usage is not None and out.usage.completion_tokens == 16
    assert out.choices[0].finish_reason == "length"


def test_stop_string_cuts_text_exactly(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    out = client.completions.create(model=MODEL_ID, prompt="x", max_tokens=60, stop="fox")
    assert out.choices[0].text == SCRIPT_TEXT.split("fox")[0]
    assert out.choices[0].finish_reason == "stop"
    # Tokens up to (and including) the one that completed "fox" were generated and are counted.
    ids = script_ids(tokenizer)
    expected = next(n for n in range(1, len(ids) + 1) if "fox" in tokenizer.decode(ids[:n]))
    assert out.usage is not None and out.usage.completion_tokens == expected


def test_earliest_of_several_stop_strings_wins(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL_ID, prompt="x", max_tokens=60, stop=["lazy", "quick"])
    assert out.choices[0].text == "Hello world. The "
    assert out.choices[0].finish_reason == "stop"


def test_eos_ends_with_stop(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    out = client.completions.create(model=MODEL_ID, prompt="[eos]", max_tokens=20)
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == tokenizer.decode(script_ids(tokenizer)[:3])
    assert out.usage is not None and out.usage.completion_tokens == 4  # eos counts as generated


def test_logprobs_of_chosen_tokens(
    client: openai.OpenAI, local_stack: LocalStack, tokenizer: Tokenizer
) -> None:
    out = client.completions.create(model=MODEL_ID, prompt="x", max_tokens=4, logprobs=1)
    lp = out.choices[0].logprobs
    assert lp is not None
    tokens = [tokenizer.decode([t], skip_special_tokens=False) for t in script_ids(tokenizer)[:4]]
    assert lp.tokens == tokens
    assert lp.token_logprobs == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert lp.text_offset == [sum(len(t) for t in tokens[:i]) for i in range(4)]
    assert lp.top_logprobs == [
        {t: pytest.approx(v)} for t, v in zip(tokens, [-0.1, -0.2, -0.3, -0.4], strict=True)
    ]
    assert (
        next(r for r in local_stack.backend.submitted if r.req_id == out.id).sampling_params.logprobs is True
    )


def test_streaming_matches_whole_and_reports_usage(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL_ID, prompt="x", max_tokens=8, stop=["brown"])
    chunks = list(
        client.completions.create(
            model=MODEL_ID,
            prompt="x",
            max_tokens=8,
            stop=["brown"],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()  # type: ignore[union-attr]


def test_streaming_logprobs_per_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(model=MODEL_ID, prompt="x", max_tokens=3, logprobs=0, stream=True)
    )
    logprobs = [
        v
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for v in c.choices[0].logprobs.token_logprobs or []
    ]
    assert logprobs == pytest.approx([-0.1, -0.2, -0.3])


def test_raw_sse_framing_ends_with_done(local_stack: LocalStack) -> None:
    body = {"model": MODEL_ID, "prompt": "x", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", local_stack.base_url + "/v1/completions", json=body, timeout=20) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert len(events) == 3 + 1 + 1  # three tokens, the finish chunk, [DONE]


def test_model_may_be_omitted(local_stack: LocalStack) -> None:
    resp = httpx.post(
        local_stack.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=20
    )
    assert resp.status_code == 200 and resp.json()["model"] == MODEL_ID
