"""Conformance with the official ``openai`` client, on real processes: the tool, rejection,
endpoint and prefix-sharing fields of issue 17 (sampling and structured outputs are in
test_openai_conformance.py), on a mixed instance and through 1P1D, with equal results.

Requests go one at a time, so both clusters run the same batch shapes and greedy / seeded outputs
must be identical token for token (ids, timestamps and tool-call ids aside).
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from conformance_support import (
    CLOCK,
    MESSAGES,
    MODEL,
    PROMPT,
    WEATHER,
    _stream,
    clients,
    on_both,
)

from splitwise.cluster import LocalCluster
from splitwise.engine.tokenizer import Tokenizer

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
