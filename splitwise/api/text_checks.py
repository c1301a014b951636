"""Text the tokenizer can take: JSON may carry lone surrogates ("\\ud800"), which are not Unicode
scalar values and make the tokenizer raise; they are a 400 naming the field, never a 500.

Length is bounded before tokenizing: no token of the vocabulary stands for more characters than its
longest entry (byte-level entries are at least as long as the text they decode to), so a text
longer than ``max_model_len x longest entry`` has more than ``max_model_len`` tokens whatever it
says. It is refused at once (400) instead of keeping the event loop in the tokenizer for seconds."""

from __future__ import annotations

from typing import Any

from splitwise.api.errors import BadRequestError
from splitwise.engine.tokenizer import Tokenizer


def longest_token_chars(tokenizer: Tokenizer) -> int:
    """The most characters one token of ``tokenizer`` can stand for (at least 1)."""
    return max((len(piece) for piece in tokenizer.vocab()), default=1) or 1


def check_length(num_chars: int, param: str, max_chars: int) -> None:
    if num_chars > max_chars:
        raise BadRequestError(
            f"{param} is {num_chars} characters: more tokens than the model's context can hold "
            f"(at most {max_chars} characters can fit max_model_len)",
            param=param,
            code="context_length_exceeded",
        )


def check_text(text: str, param: str, *, max_chars: int | None = None) -> None:
    if max_chars is not None:
        check_length(len(text), param, max_chars)
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
