"""Text the tokenizer can take: JSON may carry lone surrogates ("\\ud800"), which are not Unicode
scalar values and make the tokenizer raise; they are a 400 naming the field, never a 500."""

from __future__ import annotations

from typing import Any

from splitwise.api.errors import BadRequestError


def check_text(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequestError(
            f"{param} contains a lone surrogate ({text[exc.start : exc.end]!a}) at index {exc.start}; "
            "send valid Unicode",
            param=param,
        ) from None


def check_value(value: Any, param: str) -> None:
    """Every string inside a JSON value (messages, tools, template kwargs)."""
    if isinstance(value, str):
        check_text(value, param)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(str(key), param)
            check_value(item, f"{param}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_value(item, f"{param}[{i}]")
