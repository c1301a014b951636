"""Tool calling on /v1/chat/completions.

``tool_choice``:
  * "none" (or tools without a tool_choice and no parser): the tools reach the chat template only;
  * "required": the output is constrained (structured outputs) to a JSON list of
    ``{"name": <one of the tools>, "parameters": <its schema>}`` and every item becomes a tool call;
  * ``{"type": "function", "function": {"name": X}}``: the output is constrained to X's parameter
    schema and becomes one call of X;
  * "auto": the model decides; a parser (``--tool-call-parser``) finds calls in the text:
      hermes       ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes, Qwen 2.5/3)
      llama3_json  ``{"name": ..., "parameters": {...}}`` (optionally after <|python_tag|>, several
                   separated by ";"), Llama 3.1+ JSON tool calling
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from splitwise.api.errors import BadRequestError
from splitwise.api.protocol import ChatCompletionRequest, FunctionCall, ToolCall

TOOL_CALL_PARSERS = ("hermes", "llama3_json")


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request treats tools."""

    mode: str  # "none" | "auto" | "required" | "named"
    structured: tuple[str, str, str] | None = None  # (kind, spec, param) for required / named
    function_name: str | None = None  # named


def _function(tool: dict[str, Any], i: int) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if tool.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise BadRequestError(
            "each tool must be {'type': 'function', 'function': {'name': ...}}", param=f"tools[{i}]"
        )
    return fn


def _parameters(fn: dict[str, Any]) -> dict[str, Any]:
    params = fn.get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object"}


def plan_tools(body: ChatCompletionRequest, parser: str | None) -> ToolPlan:
    tools = body.tools or []
    functions = [_function(t, i) for i, t in enumerate(tools)]
    choice = body.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise BadRequestError("tool_choice needs tools", param="tool_choice")
        return ToolPlan("none")
    if choice == "none" or (choice is None and parser is None):
        return ToolPlan("none")
    if choice == "auto" or choice is None:
        if parser is None:
            raise BadRequestError(
                '"auto" tool choice needs the server started with --tool-call-parser (hermes or llama3_json)',
                param="tool_choice",
            )
        return ToolPlan("auto")
    if choice == "required":
        items = [
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "parameters": _parameters(fn)},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for fn in functions
        ]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        return ToolPlan("required", ("json", json.dumps(schema), "tool_choice"))
    assert isinstance(choice, dict)
    name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
    match = next((fn for fn in functions if fn["name"] == name), None)
    if match is None:
        raise BadRequestError(f"tool_choice names no function among the tools: {name!r}", param="tool_choice")
    return ToolPlan(
        "named", ("json", json.dumps(_parameters(match)), "tool_choice"), function_name=match["name"]
    )


def calls_of_constrained(plan: ToolPlan, text: str) -> list[ToolCall]:
    """The tool calls of a required / named request's (grammar-constrained) output."""
    try:
        value = json.loads(text)
    except ValueError:
        return []  # cut short by max_tokens: no complete call
    if plan.mode == "named":
        assert plan.function_name is not None
        return [_call(plan.function_name, value)]
    return [_call(item["name"], item.get("parameters", {})) for item in value if isinstance(item, dict)]


def _call(name: str, arguments: Any) -> ToolCall:
    return ToolCall(id=new_call_id(), function=FunctionCall(name=name, arguments=json.dumps(arguments)))


# -- "auto": parsers ------------------------------------------------------------------------------

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def parse_tool_calls(parser: str, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole output; text that is no valid call stays content."""
    if parser == "hermes":
        start = text.find("<tool_call>")
        if start == -1:
            return text, []
        calls = []
        for body in _HERMES.findall(text[start:]):
            try:
                obj = json.loads(body)
            except ValueError:
                return text, []
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return text, []
            calls.append(_call(obj["name"], obj.get("arguments", {})))
        content = text[:start]
        return (content if content.strip() else None), calls
    if parser == "llama3_json":
        stripped = text.strip().removeprefix("<|python_tag|>").strip()
        if not stripped.startswith("{"):
            return text, []
        calls = []
        decoder = json.JSONDecoder()
        rest = stripped
        while rest:
            try:
                obj, end = decoder.raw_decode(rest)
            except ValueError:
                return text, []
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return text, []
            calls.append(_call(obj["name"], obj.get("parameters", obj.get("arguments", {}))))
            rest = rest[end:].strip().removeprefix(";").strip()
        return None, calls
    raise ValueError(f"--tool-call-parser: {parser!r} is not one of {', '.join(TOOL_CALL_PARSERS)}")


class ToolStreamFilter:
    """Streaming "auto": content flows until a tool call may be starting; from there text is held
    back, and at the end the held text is parsed (calls) or released (content)."""

    def __init__(self, parser: str) -> None:
        self.parser = parser
        self._marker = "<tool_call>" if parser == "hermes" else None
        self._held = ""
        self._holding = False
        self._seen_text = False

    def push(self, text: str) -> str:
        """The part of ``text`` that is certainly content."""
        if self._holding:
            self._held += text
            return ""
        combined = self._held + text
        if self._marker is None:  # llama3_json: a call is the whole output, so it starts with "{"
            if not self._seen_text and combined.strip() == "":
                self._held = combined
                return ""
            self._seen_text = True
            head = combined.lstrip()
            if head.startswith("{") or head.startswith("<|python_tag|>") or "<|python_tag|>".startswith(head):
                self._holding = True
                self._held = combined
                return ""
            self._held = ""
            return combined
        index = combined.find(self._marker)
        if index != -1:
            self._holding = True
            self._held = combined[index:]
            return combined[:index]
        keep = _partial_suffix(combined, self._marker)
        self._held = combined[len(combined) - keep :] if keep else ""
        return combined[: len(combined) - keep]

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(remaining content, calls) at the end of the output."""
        held, self._held = self._held, ""
        if not self._holding:
            return held, []
        content, calls = parse_tool_calls(self.parser, held)
        if not calls:
            return held, []
        return content or "", calls


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0
