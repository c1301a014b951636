"""Options and helpers shared by several commands."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

# splitwise.api.body_limit.DEFAULT_MAX_REQUEST_BYTES (not imported: the CLI starts without starlette)
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024


def resolve_model(model: str | None, *, default_size: str = "tiny") -> Path:
    """--model DIR, or the built-in checkpoint (generated once, cached) when it is left out."""
    if model is None:
        from splitwise.engine.tiny_model import default_model_dir

        return default_model_dir(default_size)
    path = Path(model)
    if not path.is_dir():
        looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
        hint = (
            " (a hub id? splitwise loads local checkpoints: download it first)" if looks_like_hub_id else ""
        )
        raise click.BadParameter(f"{model} is not a directory{hint}", param_hint="--model")
    if not (path / "config.json").is_file():
        raise click.BadParameter(
            f"{model} has no config.json (expected a Hugging Face model directory)", param_hint="--model"
        )
    return path


def read_model_config(model_dir: str) -> dict[str, Any]:
    """The checkpoint's config.json (``resolve_model`` checked that it exists)."""
    try:
        data = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(
            f"{model_dir}/config.json is unreadable: {exc}", param_hint="--model"
        ) from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{model_dir}/config.json is not a JSON object", param_hint="--model")
    return data


F = TypeVar("F", bound=Callable[..., Any])

# The flags `splitwise serve` and `splitwise router` share: what model is served under which id,
# the HTTP listener and the API's limits. Both serve the same OpenAI app (splitwise/api), so a flag
# of that app means the same on an instance and on a router; declared once here so they cannot drift.
_SERVER_OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (
        ("--model",),
        {"default": None, "help": "Local Hugging Face model directory (default: the built-in model)."},
    ),
    (
        ("--default-model-size",),
        {
            "type": click.Choice(["tiny", "small"]),
            "default": "small",
            "show_default": True,
            "help": "Which built-in model to use when --model is left out.",
        },
    ),
    (
        ("--served-model-name",),
        {"default": None, "help": "Model id clients use (default: the directory name)."},
    ),
    (("--host",), {"default": "127.0.0.1", "show_default": True, "help": "Bind address of every listener."}),
    (
        ("--port",),
        {
            "type": click.IntRange(0, 65535),
            "default": 8000,
            "show_default": True,
            "help": "HTTP port (0: a free port, reported).",
        },
    ),
    (
        ("--max-model-len",),
        {"type": click.IntRange(min=1), "default": None, "help": "Context length (default: the model's)."},
    ),
    (
        ("--api-key",),
        {
            "default": None,
            "envvar": "SPLITWISE_API_KEY",
            "help": "Require 'Authorization: Bearer KEY' (or env SPLITWISE_API_KEY).",
        },
    ),
    (
        ("--max-request-bytes",),
        {
            "type": int,  # validated by the instance's and the router's config (names the flag)
            "default": DEFAULT_MAX_REQUEST_BYTES,
            "show_default": True,
            "help": "HTTP request bodies larger than this are answered 413 before they are read or parsed.",
        },
    ),
    (
        ("--tool-call-parser",),
        {
            "type": click.Choice(["hermes", "llama3_json"]),
            "default": None,
            "help": 'Parse tool calls out of the text for tool_choice "auto" '
            "(Hermes/Qwen <tool_call> or Llama 3 JSON).",
        },
    ),
]
SERVER_OPTION_NAMES = tuple(flags[0] for flags, _kwargs in _SERVER_OPTIONS) + ("--ready-file",)


def server_options(func: F) -> F:
    """click decorator: the flags of the OpenAI server shared by `splitwise serve` and `splitwise
    router` (``_SERVER_OPTIONS``), then every scheduler flag (``scheduler_options``: both dispatch
    through the same Redis scheduler), then --ready-file."""
    from scheduler.config import scheduler_options

    func = click.option(
        "--ready-file",
        default=None,
        type=click.Path(dir_okay=False),
        help="Write a JSON line with the ports here once serving.",
    )(func)
    func = scheduler_options(func)
    for flags, kwargs in reversed(_SERVER_OPTIONS):
        func = click.option(*flags, **kwargs)(func)
    return func


def fail_on_value_error(exc: ValueError) -> click.ClickException:
    """A config error: BadParameter naming the flag when the message starts with one."""
    message = str(exc)
    if message.startswith("--"):
        flag, _, rest = message.partition(":")
        return click.BadParameter(rest.strip() or message, param_hint=flag)
    return click.ClickException(message)
