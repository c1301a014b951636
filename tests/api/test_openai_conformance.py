"""Conformance with the official ``openai`` client, on real processes: every sampling, structured
output, tool and rejection field of issue 17, on a mixed instance and through 1P1D (the first token
sampled on P, the rest on D), with equal results.

Requests go one at a time, so both clusters run the same batch shapes and greedy / seeded outputs
must be identical token for token (ids, timestamps and tool-call ids aside).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from splitwise.cluster import LocalCluster
from splitwise.engine.tiny_model import default_model_dir
from splitwise.engine.tokenizer import Tokenizer
from tests.instance.helpers import start_cluster

MODEL = "llama-tiny-seed0-v1"
MESSAGES = [{"role": "user", "content": "Tell me about the quick brown fox."}]
PROMPT = "The quick brown fox jumps over the lazy dog and"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def clusters() -> Iterator[dict[str, LocalCluster]]:
    started: dict[str, LocalCluster] = {}
    try:
        extra = ["--tool-call-parser", "hermes"]
        model = default_model_dir("tiny")
        started["mixed"] = start_cluster(model, extra=extra, num_prefill=0, num_decode=0, num_mixed=1)
        started["1P1D"] = start_cluster(model, extra=extra, num_prefill=1, num_decode=1)
        yield started
    finally:
        for cluster in started.values():
            cluster.stop()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir("tiny"))


def clients(clusters: dict[str, LocalCluster]) -> dict[str, openai.OpenAI]:
    return {
        name: openai.OpenAI(base_url=c.entry.base_url, api_key="unused", max_retries=0)
        for name, c in clusters.items()
    }


def _normalise(value: Any, approx: bool) -> Any:
    if isinstance(value, dict):
        return {k: _normalise(v, approx) for k, v in value.items() if k not in ("id", "created")}
    if isinstance(value, list):
        return [_normalise(v, approx) for v in value]
    if isinstance(value, float) and approx:
        return pytest.approx(value, abs=1e-4)  # the same tokens; float sums may differ in the last bits
    return value


def on_both(clusters: dict[str, LocalCluster], call: Callable[[openai.OpenAI], Any]) -> Any:
    """Run ``call`` against both clusters; assert equal results; return the mixed one's."""
    results = {name: call(client) for name, client in clients(clusters).items()}
    dumped = {
        name: _normalise(r.model_dump() if hasattr(r, "model_dump") else r, approx=name == "mixed")
        for name, r in results.items()
    }
    assert dumped["1P1D"] == dumped["mixed"]
    return results["mixed"]


def _stream(stream: Any) -> dict[str, Any]:
    """A stream merged per choice (chunk boundaries differ between topologies, content must not)."""
    merged: dict[str, Any] = {"choices": {}, "usage": None}
    for chunk in stream:
        data = chunk.model_dump()
        merged["usage"] = data.get("usage") or merged["usage"]
        for choice in data["choices"]:
            out = merged["choices"].setdefault(
                choice["index"], {"text": "", "logprobs": [], "tool_calls": [], "finish_reason": None}
            )
            delta = choice.get("delta") or {}
            out["text"] += choice.get("text") or delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                out["tool_calls"].append({k: v for k, v in call.items() if k != "id"})
            logprobs = choice.get("logprobs") or {}
            out["logprobs"] += logprobs.get("content") or logprobs.get("top_logprobs") or []
            out["finish_reason"] = choice.get("finish_reason") or out["finish_reason"]
    return merged


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


# -- tools -------------------------------------------------------------------------------------


def test_tool_choice_named_and_required(clusters: dict[str, LocalCluster]) -> None:
    named = on_both(
        clusters,
        lambda c: c.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=40,
            seed=1,
            tools=[WEATHER, CLOCK],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        ).model_dump(exclude={"choices": {0: {"message": {"tool_calls": {"__all__": {"id"}}}}}}),
    )
    calls = named["choices"][0]["message"]["tool_calls"]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), WEATHER["function"]["parameters"])
    client = clients(clusters)["1P1D"]
    required = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=80, seed=2, tools=[WEATHER, CLOCK], tool_choice="required"
    )
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        tool = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    chunks = _stream(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=40,
            seed=1,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            stream=True,
        )
    )
    streamed = chunks["choices"][0]["tool_calls"]
    assert [tc["function"]["name"] for tc in streamed] == ["get_weather"]
    assert streamed[0]["function"]["arguments"] == calls[0]["function"]["arguments"]


def test_tools_reach_the_template_and_auto_parses(clusters: dict[str, LocalCluster]) -> None:
    base = httpx.post(
        clusters["mixed"].entry.base_url.removesuffix("/v1") + "/tokenize", json={"messages": MESSAGES}
    ).json()
    out = on_both(
        clusters,
        lambda c: c.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=6,
            temperature=0,
            tools=[WEATHER],
            tool_choice="auto",
            extra_body={"add_generation_prompt": False, "chat_template_kwargs": {"enable_thinking": False}},
        ),
    )
    # add_generation_prompt: false drops "<|im_start|>assistant\n" from the prompt.
    assert out.usage.prompt_tokens < base["count"]
    assert isinstance(out.choices[0].message.content, str) or out.choices[0].message.tool_calls


# -- rejections, endpoints, request ids --------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": [""]}, "prompt"),
        ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": PROMPT, "best_of": 2}, "best_of"),
        (
            {
                "prompt": PROMPT,
                "extra_body": {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            },
            "response_format.json_schema",
        ),
        ({"prompt": PROMPT, "extra_body": {"guided_json": {"type": "bogus"}}}, "guided_json"),
        ({"prompt": PROMPT, "extra_body": {"use_beam_search": True}}, "use_beam_search"),
    ],
)
def test_rejections_name_the_field(
    clusters: dict[str, LocalCluster], kwargs: dict[str, Any], param: str
) -> None:
    for client in clients(clusters).values():
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, max_tokens=4, **kwargs)
        assert info.value.body["param"] == param  # type: ignore[index]


def test_endpoints_and_request_id(clusters: dict[str, LocalCluster], tokenizer: Tokenizer) -> None:
    for name, cluster in clusters.items():
        root = cluster.entry.base_url.removesuffix("/v1")
        tok = httpx.post(root + "/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
        assert (
            tok["tokens"] == tokenizer.encode(PROMPT)
            and tok["count"] == len(tok["tokens"])
            and tok["max_model_len"] > 0
        )
        detok = httpx.post(root + "/detokenize", json={"tokens": tok["tokens"]}).json()
        assert detok["prompt"] == tokenizer.decode(tok["tokens"])
        assert httpx.get(root + "/version").json()["version"]
        assert httpx.get(root + "/ping").status_code == 200
        rid = f"conformance-{name}"
        resp = httpx.post(
            root + "/v1/completions",
            json={"prompt": PROMPT, "max_tokens": 2},
            headers={"X-Request-Id": rid},
            timeout=60,
        )
        assert (
            resp.status_code == 200
            and resp.headers["x-request-id"] == rid
            and resp.json()["id"] == f"cmpl-{rid}"
        )
        for child in cluster.children:  # the id is in the request's log lines on every node it touched
            assert f"cmpl-{rid}" in child.log_file.read_text(), (child.role, cluster.log_tail(child))


def _prefix_hits(cluster: LocalCluster) -> float:
    text = httpx.get(cluster.entry.base_url.removesuffix("/v1") + "/metrics").text
    for name in ("splitwise_prefix_cache_hits_tokens_total", "vllm:prefix_cache_hits_total"):
        for line in text.splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no prefix-cache hit counter in /metrics")


def test_n_siblings_reuse_the_prompt_blocks(clusters: dict[str, LocalCluster]) -> None:
    """Siblings start after the first choice's first token: they find the prompt in the prefix cache."""
    mixed = clusters["mixed"]
    prompt = list(range(100, 180))  # 80 tokens, not sent before
    before = _prefix_hits(mixed)
    resp = httpx.post(
        mixed.entry.base_url + "/completions",
        json={"prompt": prompt, "max_tokens": 3, "n": 3, "seed": 1},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text

    def grew() -> bool:
        return (
            _prefix_hits(mixed) - before >= 2 * 76
        )  # 2 siblings x the prompt's full blocks (block 4, last excluded)

    deadline = time.monotonic() + 10  # the exporter copies engine counters once a second: poll for it
    while not grew():
        assert time.monotonic() < deadline, _prefix_hits(mixed) - before
        time.sleep(0.2)


HERMES_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}</tool_call>'


def test_auto_tool_calls_are_parsed_whole_and_streamed(clusters: dict[str, LocalCluster]) -> None:
    """A random model never writes a Hermes call by itself: a guided_regex makes it, and the hermes
    parser must turn it into message.tool_calls (and into a tool_calls delta when streaming)."""
    from splitwise.engine.guided import regex_escape

    extra = {"guided_regex": "Sure\\. " + regex_escape(HERMES_CALL)}
    whole = on_both(
        clusters,
        lambda c: c.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=80,
            temperature=0,  # unseeded sampling differs between topologies (one shared generator each)
            tools=[WEATHER],
            tool_choice="auto",
            extra_body=extra,
        ).model_dump(exclude={"choices": {0: {"message": {"tool_calls": {"__all__": {"id"}}}}}}),
    )
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Sure. "
    assert [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in choice["message"]["tool_calls"]
    ] == [("get_weather", {"city": "Paris", "days": 2})]
    streamed = on_both(
        clusters,
        lambda c: _stream(
            c.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                max_tokens=80,
                temperature=0,
                tools=[WEATHER],
                tool_choice="auto",
                extra_body=extra,
                stream=True,
            )
        ),
    )
    one = streamed["choices"][0]
    assert one["text"] == "Sure. " and one["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in one["tool_calls"]] == ["get_weather"]


def test_unknown_fields_are_logged_once(clusters: dict[str, LocalCluster]) -> None:
    mixed = clusters["mixed"]
    for _ in range(2):
        resp = httpx.post(
            mixed.entry.base_url + "/completions",
            json={"prompt": PROMPT, "max_tokens": 1, "frobnicate_level": 3},
            timeout=60,
        )
        assert resp.status_code == 200
    log_text = "".join(c.log_file.read_text() for c in mixed.children)
    lines = [line for line in log_text.splitlines() if "frobnicate_level" in line]
    assert len(lines) == 1 and "request field ignored" in lines[0]
