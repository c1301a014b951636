"""Conformance with the official ``openai`` client, on real processes: every sampling and
structured-output field of issue 17 (tools, rejections and endpoints are in
test_openai_conformance_tools.py), on a mixed instance and through 1P1D (the first token sampled
on P, the rest on D), with equal results.

Requests go one at a time, so both clusters run the same batch shapes and greedy / seeded outputs
must be identical token for token (ids, timestamps and tool-call ids aside).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jsonschema
import openai
import pytest
from conformance_support import (
    MESSAGES,
    MODEL,
    PROMPT,
    WEATHER,
    _stream,
    clients,
    on_both,
)

from splitwise.cluster import LocalCluster
from splitwise.engine.tiny_model import default_model_dir
from splitwise.engine.tokenizer import Tokenizer

# -- sampling ----------------------------------------------------------------------------------


def test_penalties_change_greedy_output_identically(clusters: dict[str, LocalCluster]) -> None:
    def run(penalties: dict[str, Any]) -> Callable[[openai.OpenAI], Any]:
        return lambda c: c.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=24,
            temperature=0,
            extra_body={"ignore_eos": True, **penalties},
        )

    plain = on_both(clusters, run({}))
    repeated = len(plain.choices[0].text.split()) != len(set(plain.choices[0].text.split()))
    penalised = on_both(
        clusters, run({"presence_penalty": 1.5, "frequency_penalty": 1.0, "repetition_penalty": 1.5})
    )
    assert penalised.usage.completion_tokens == 24
    if repeated:
        assert penalised.choices[0].text != plain.choices[0].text


def test_logit_bias_forces_a_token(clusters: dict[str, LocalCluster], tokenizer: Tokenizer) -> None:
    out = on_both(
        clusters,
        lambda c: c.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0.7, seed=1, logit_bias={"42": 100}
        ),
    )
    assert out.choices[0].text == tokenizer.decode([42] * 5)


def test_seeded_min_p_top_k_sampling(clusters: dict[str, LocalCluster]) -> None:
    out = on_both(
        clusters,
        lambda c: c.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=12,
            temperature=1.2,
            seed=5,
            extra_body={"min_p": 0.1, "top_k": 20, "ignore_eos": True},
        ),
    )
    assert out.usage.completion_tokens == 12


def test_stop_token_ids_counted_and_stop_reason(
    clusters: dict[str, LocalCluster], tokenizer: Tokenizer
) -> None:
    base = on_both(
        clusters,
        lambda c: c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0),
    )
    tokens = [tokenizer.encode(t, add_special_tokens=False) for t in base.choices[0].logprobs.tokens]
    stop_id = tokens[2][0] if len(tokens[2]) == 1 else None
    if stop_id is None or any(tokens[i] == [stop_id] for i in range(2)):
        pytest.skip("the third greedy token is not a single unique token id")
    out = on_both(
        clusters,
        lambda c: c.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"stop_token_ids": [stop_id]}
        ),
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == stop_id
    assert out.usage.completion_tokens == 3  # the stop token is counted, as vLLM counts it
    assert choice.text == "".join(base.choices[0].logprobs.tokens[:2])
    included = on_both(
        clusters,
        lambda c: c.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            extra_body={"stop_token_ids": [stop_id], "include_stop_str_in_output": True},
        ),
    )
    assert included.choices[0].text == "".join(base.choices[0].logprobs.tokens[:3])
    delayed = on_both(
        clusters,
        lambda c: c.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            extra_body={"stop_token_ids": [stop_id], "min_tokens": 5},
        ),
    )
    assert delayed.usage.completion_tokens >= 5


def test_stop_string_reason_and_include(clusters: dict[str, LocalCluster]) -> None:
    base = on_both(
        clusters, lambda c: c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    )
    text = base.choices[0].text
    stop = text[4:7]
    if not stop.strip() or text.find(stop) != 4:
        pytest.skip("no clean stop string in the greedy text")
    out = on_both(
        clusters,
        lambda c: c.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stop=[stop],
            extra_body={"include_stop_str_in_output": True},
        ),
    )
    assert out.choices[0].text == text[:7] and out.choices[0].model_extra["stop_reason"] == stop


def test_completion_top_logprobs_k(clusters: dict[str, LocalCluster]) -> None:
    out = on_both(
        clusters,
        lambda c: c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3),
    )
    lp = out.choices[0].logprobs
    assert max(len(top) for top in lp.top_logprobs) >= 3
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        # k alternatives plus the chosen one, keyed by text (byte tokens may share the text "\ufffd")
        assert 1 <= len(top) <= 4 and top[token] == pytest.approx(logprob)
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the chosen token is the most likely
    streamed = on_both(
        clusters,
        lambda c: _stream(
            c.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3, stream=True
            )
        ),
    )
    tops = streamed["choices"][0]["logprobs"]
    assert len(tops) == 6 and all(1 <= len(t) <= 4 for t in tops) and max(len(t) for t in tops) >= 3


def test_chat_top_logprobs_streaming(clusters: dict[str, LocalCluster]) -> None:
    whole = on_both(
        clusters,
        lambda c: c.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=4
        ),
    )
    content = whole.choices[0].logprobs.content
    assert len(content) == 5 and all(
        len(e.top_logprobs) == 4 and e.top_logprobs[0].token == e.token for e in content
    )
    chunks = on_both(
        clusters,
        lambda c: _stream(
            c.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                max_tokens=5,
                temperature=0,
                logprobs=True,
                top_logprobs=4,
                stream=True,
            )
        ),
    )
    entries = chunks["choices"][0]["logprobs"]
    assert [[t["token"] for t in e["top_logprobs"]] for e in entries] == [
        [t.token for t in e.top_logprobs] for e in content
    ]
    streamed_lps = [t["logprob"] for e in entries for t in e["top_logprobs"]]
    assert streamed_lps == pytest.approx([t.logprob for e in content for t in e.top_logprobs], abs=1e-4)


def test_n_batch_and_echo(clusters: dict[str, LocalCluster]) -> None:
    out = on_both(
        clusters,
        lambda c: c.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=6, n=3, seed=9, extra_body={"ignore_eos": True}
        ),
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.text for c in out.choices}) > 1  # siblings get seed + j
    alone = on_both(
        clusters, lambda c: c.completions.create(model=MODEL, prompt="one two", max_tokens=4, temperature=0)
    )
    batch = on_both(
        clusters,
        lambda c: c.completions.create(
            model=MODEL, prompt=["one two", "three"], max_tokens=4, temperature=0, echo=True
        ),
    )
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == "one two" + alone.choices[0].text
    assert batch.choices[1].text.startswith("three")
    assert batch.usage.prompt_tokens == alone.usage.prompt_tokens + len(
        Tokenizer.from_dir(default_model_dir("tiny")).encode("three")
    )
    streamed = on_both(
        clusters,
        lambda c: _stream(
            c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, n=2, seed=3, stream=True)
        ),
    )
    assert sorted(streamed["choices"]) == [0, 1] and all(
        c["finish_reason"] for c in streamed["choices"].values()
    )
    echoed = on_both(
        clusters,
        lambda c: c.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True
        ),
    )
    lp = echoed.choices[0].logprobs
    num_prompt = echoed.usage.prompt_tokens
    assert echoed.choices[0].text.startswith(PROMPT) and len(lp.tokens) == num_prompt + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(top) >= 1 for top in lp.top_logprobs[1:])
    streamed_echo = on_both(
        clusters,
        lambda c: _stream(
            c.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True, stream=True
            )
        ),
    )
    assert streamed_echo["choices"][0]["text"] == echoed.choices[0].text
    assert len(streamed_echo["choices"][0]["logprobs"]) == num_prompt + 3


# -- structured outputs ------------------------------------------------------------------------


def test_guided_choice_regex_and_json_schema(clusters: dict[str, LocalCluster]) -> None:
    out = on_both(
        clusters,
        lambda c: c.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=6,
            seed=2,
            extra_body={"guided_choice": ["yes", "no", "maybe"]},
        ),
    )
    assert out.choices[0].text in ("yes", "no", "maybe") and out.choices[0].finish_reason == "stop"
    out = on_both(
        clusters,
        lambda c: c.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=10,
            seed=2,
            extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-c]{2}"}},
        ),
    )
    import re

    assert re.fullmatch("[0-9]{3}-[a-c]{2}", out.choices[0].text)
    schema = WEATHER["function"]["parameters"]
    out = on_both(
        clusters,
        lambda c: c.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=40,
            seed=4,
            response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}},
        ),
    )
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)


def test_twenty_json_schema_requests_through_1p1d(clusters: dict[str, LocalCluster]) -> None:
    """The grammar is what makes a random tiny model's output valid: each schema's minimal completion
    fits max_tokens, strings are bounded, and every request must end on its grammar's stop."""
    client = clients(clusters)["1P1D"]
    schemas = [
        {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["n"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3]}},
            "required": ["color", "size"],
            "additionalProperties": False,
        },
        {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 4},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
            },
            "required": ["name", "tags"],
            "additionalProperties": False,
        },
    ]
    for i in range(20):
        schema = schemas[i % len(schemas)]
        out = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=64,
            temperature=1.0,
            seed=i,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}},
        )
        choice = out.choices[0]
        assert choice.finish_reason == "stop", (i, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)
