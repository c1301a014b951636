"""Request bodies parsed and validated without stalling the event loop (issue #13).

A body of at most ``OFFLOAD_BODY_BYTES`` is parsed on the loop (microseconds). A larger one (up to
``--max-request-bytes``) is parsed and validated on a worker thread, and so are its prompts'
tokenization and chat template (``off_loop``). A thread alone does not help: the C JSON scanner,
pydantic's validator and a full garbage collection each hold the GIL for the whole call, so a
5 MB body of nested values stalled every other stream (and the heartbeat threads) for seconds,
measured. So on the thread:

- the JSON scanner is the standard library's pure-Python one (``json.scanner.py_make_scanner``;
  strings are still scanned in C, one call each): it runs bytecode, so the interpreter hands the
  GIL to the loop every switch interval (5 ms); slower for this one request, never for the others;
- the cyclic garbage collector is paused while any such parse runs (``_NoCollection``): parsing
  allocates only acyclic trees, and an allocation-triggered gen-2 collection over millions of new
  objects held the GIL for up to seconds.

Errors are FastAPI's own ``RequestValidationError`` with FastAPI's ``loc`` (``("body", ...)``), so
the one error handler (``errors.validation_error``) answers both paths with the same 400.

    measured (bench below, loaded 2-core machine), max event-loop gap while parsing on the thread:
    8 MB of token ids 435 ms inline -> 59 ms; 5 MB of nested extras 3258 ms inline -> 172 ms
"""

from __future__ import annotations

import asyncio
import email.message
import gc
import json
import json.scanner
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

OFFLOAD_BODY_BYTES = 64 * 1024

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


class _YieldingDecoder(json.JSONDecoder):
    """``json.JSONDecoder`` with the pure-Python scanner: same results, the GIL is released
    between values."""

    def __init__(self) -> None:
        super().__init__()
        self.scan_once = json.scanner.py_make_scanner(self)  # type: ignore[attr-defined]  # not in typeshed


class _NoCollection:
    """Pause the cyclic GC while at least one large body is being parsed (a process-wide switch,
    so the parses in flight are counted under a lock held only around the counter)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0

    def __enter__(self) -> None:
        with self._lock:
            self._active += 1
            if self._active == 1:
                self._was_enabled = gc.isenabled()
                gc.disable()

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0 and self._was_enabled:
                gc.enable()


_NO_COLLECTION = _NoCollection()


def _is_json(content_type: str | None) -> bool:
    """FastAPI's rule: no Content-Type, application/json or application/*+json is JSON."""
    if not content_type:
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def parse(raw: bytes, content_type: str | None, model: type[M], *, yielding: bool = False) -> M:
    """``raw`` as a validated ``model``, or RequestValidationError shaped as FastAPI's."""
    value: Any = raw
    if not raw:
        value = None
    elif _is_json(content_type):
        try:
            text = raw.decode("utf-8")
            value = _YieldingDecoder().decode(text) if yielding else json.loads(text)
        except json.JSONDecodeError as exc:
            raise RequestValidationError(
                [
                    {
                        "type": "json_invalid",
                        "loc": ("body", exc.pos),
                        "msg": "JSON decode error",
                        "input": {},
                        "ctx": {"error": exc.msg},
                    }
                ]
            ) from None
        except UnicodeDecodeError as exc:
            raise RequestValidationError(
                [
                    {
                        "type": "json_invalid",
                        "loc": ("body", exc.start),
                        "msg": "JSON decode error",
                        "input": {},
                        "ctx": {"error": "invalid UTF-8"},
                    }
                ]
            ) from None
    if value is None:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
        )
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def _parse_large(raw: bytes, content_type: str | None, model: type[M]) -> M:
    with _NO_COLLECTION:
        return parse(raw, content_type, model, yielding=True)


class Body:
    """One request's body: ``value`` once parsed; ``off_loop`` runs the request's other heavy
    steps (tokenizing, the chat template) on a thread when the body was large, else inline."""

    def __init__(self, is_large: bool) -> None:
        self.is_large = is_large

    async def off_loop(self, fn: Callable[[], T]) -> T:
        if not self.is_large:
            return fn()
        with _NO_COLLECTION:
            return await asyncio.to_thread(fn)


async def read_body(request: Request, model: type[M]) -> tuple[M, Body]:
    """Read and validate the body of ``request`` as ``model`` (a thread for a large one)."""
    raw = await request.body()
    content_type = request.headers.get("content-type")
    if len(raw) <= OFFLOAD_BODY_BYTES:
        return parse(raw, content_type, model), Body(is_large=False)
    return await asyncio.to_thread(_parse_large, raw, content_type, model), Body(is_large=True)


def body_dependency(model: type[M]) -> Callable[[Request], Any]:
    """A FastAPI dependency giving ``(model instance, Body)`` for a route."""

    async def dependency(request: Request) -> tuple[M, Body]:
        return await read_body(request, model)

    return dependency


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a ``body_dependency`` route: a JSON object body (the fields are those of
    ``model``, named in the description; FastAPI does not see the model itself)."""
    return {
        "requestBody": {
            "required": True,
            "description": f"a JSON object: {model.__name__} (OpenAI's fields, vLLM's extras)",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    }
