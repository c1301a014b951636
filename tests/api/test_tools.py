"""Tool-call parsing (hermes, llama3_json), the streaming hold-back filter, and tool_choice plans."""

from __future__ import annotations

import json

import pytest

from splitwise.api.errors import BadRequestError
from splitwise.api.protocol import ChatCompletionRequest
from splitwise.api.tools import ToolStreamFilter, calls_of_constrained, parse_tool_calls, plan_tools

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def _names_args(calls: list) -> list[tuple[str, dict]]:  # type: ignore[type-arg]
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def test_hermes_parser() -> None:
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    text += '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    content, calls = parse_tool_calls("hermes", text)
    assert content == "Let me check."
    assert _names_args(calls) == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert parse_tool_calls("hermes", "no calls here") == ("no calls here", [])
    broken = "<tool_call>{not json</tool_call>"
    assert parse_tool_calls("hermes", broken) == (broken, [])  # not a call: stays content


def test_llama3_json_parser() -> None:
    content, calls = parse_tool_calls(
        "llama3_json", '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    )
    assert content is None and _names_args(calls) == [("a", {"x": 1}), ("b", {})]
    assert parse_tool_calls("llama3_json", "plain text") == ("plain text", [])
    with pytest.raises(ValueError, match="--tool-call-parser"):
        parse_tool_calls("nope", "x")


@pytest.mark.parametrize("split", [1, 3, 5, 11, 12])
def test_stream_filter_holds_back_a_split_marker(split: int) -> None:
    text = 'Hi there<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    pieces = [text[i : i + split] for i in range(0, len(text), split)]
    f = ToolStreamFilter("hermes")
    content = "".join(f.push(p) for p in pieces)
    rest, calls = f.finish()
    assert content + rest == "Hi there"
    assert _names_args(calls) == [("get_weather", {"city": "Oslo"})]


def test_stream_filter_releases_text_that_is_no_call() -> None:
    f = ToolStreamFilter("hermes")
    assert f.push("a <tool") == "a "
    assert f.push(" box>") == "<tool box>"
    assert f.finish() == ("", [])
    g = ToolStreamFilter("llama3_json")
    assert g.push("{not") == ""
    assert g.finish() == ("{not", [])


def _chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_plans() -> None:
    assert plan_tools(_chat(), None).mode == "none"
    assert plan_tools(_chat(tools=[TOOL]), None).mode == "none"
    assert plan_tools(_chat(tools=[TOOL]), "hermes").mode == "auto"
    required = plan_tools(_chat(tools=[TOOL], tool_choice="required"), None)
    assert required.mode == "required" and required.structured is not None
    schema = json.loads(required.structured[1])
    assert schema["items"]["anyOf"][0]["properties"]["name"] == {"const": "get_weather"}
    named = plan_tools(
        _chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}}), None
    )
    assert named.function_name == "get_weather"
    assert _names_args(calls_of_constrained(named, '{"city": "Paris"}')) == [
        ("get_weather", {"city": "Paris"})
    ]
    assert calls_of_constrained(named, '{"city": "Pa') == []  # cut short by max_tokens
    listed = calls_of_constrained(required, '[{"name": "get_weather", "parameters": {"city": "Rome"}}]')
    assert _names_args(listed) == [("get_weather", {"city": "Rome"})]
    with pytest.raises(BadRequestError, match="--tool-call-parser"):
        plan_tools(_chat(tools=[TOOL], tool_choice="auto"), None)
    with pytest.raises(BadRequestError, match="names no function"):
        plan_tools(_chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "x"}}), None)
