"""Large request bodies are parsed off the event loop (issue #13): the thread path answers exactly
what the inline path (and FastAPI) answers, and while it parses, the loop keeps running: its
longest pause is a fraction of the pause the same parse causes inline (ratio measured here)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import pytest
from fastapi.exceptions import RequestValidationError

from splitwise.api.body_parse import _parse_large, parse
from splitwise.api.protocol import ChatCompletionRequest, CompletionRequest

JSON = "application/json"


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        (b'{"prompt": "hi", "max_tokens": 3, "extra_field": [1, {"a": null}]}', JSON),
        (b'{"prompt": [1, 2, 3], "temperature": 0.5}', None),
        (b'{"prompt": "a\\ud800b"}', "application/vnd.api+json"),  # parsed: the surrogate is checked later
        (b'{"prompt": "x",', JSON),  # invalid JSON
        (b"[1, 2]", JSON),  # not an object
        (b"", JSON),  # no body
        (b'{"prompt": "x"}', "text/plain"),  # not sent as JSON
        (b'{"prompt": 5}', JSON),  # a bad field
        (b'{"prompt": "x", "max_tokens": "many"}', JSON),
        (b'{"prompt": "\xff"}', JSON),  # not UTF-8
    ],
)
def test_the_thread_path_answers_what_the_inline_path_does(raw: bytes, content_type: str | None) -> None:
    def outcome(yielding: bool) -> object:
        try:
            return parse(raw, content_type, CompletionRequest, yielding=yielding).model_dump()
        except RequestValidationError as exc:
            return [(e["type"], e["loc"]) for e in exc.errors()]

    inline, threaded = outcome(False), outcome(True)
    assert inline == threaded
    assert threaded == outcome(False)  # and it is deterministic


def test_errors_keep_fastapis_body_location() -> None:
    with pytest.raises(RequestValidationError) as raised:
        parse(b'{"messages": 5}', JSON, ChatCompletionRequest)
    assert all(e["loc"][0] == "body" for e in raised.value.errors())
    with pytest.raises(RequestValidationError) as raised:
        parse(b'{"prompt": ', JSON, CompletionRequest)
    [error] = raised.value.errors()
    assert error["type"] == "json_invalid" and error["loc"] == ("body", 11)


async def _longest_loop_pause(work: Callable[[], object], on_thread: bool) -> float:
    """The longest pause of a 1 ms ticker on the loop while ``work`` runs (inline or on a thread)."""
    pauses: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            pauses.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    if on_thread:
        await asyncio.to_thread(work)
    else:
        work()
    await asyncio.sleep(0.02)
    stop.set()
    await task
    return max(pauses)


def test_a_large_body_parsed_on_the_thread_leaves_the_loop_running() -> None:
    """~4 MB of nested values (valid: unknown fields are kept, as vLLM does)."""
    body = {"prompt": "hi", "max_tokens": 2, "metadata": [{"a": i, "b": [i, str(i)]} for i in range(100_000)]}
    raw = json.dumps(body).encode()
    inline = asyncio.run(_longest_loop_pause(lambda: parse(raw, JSON, CompletionRequest), on_thread=False))
    threaded = asyncio.run(
        _longest_loop_pause(lambda: _parse_large(raw, JSON, CompletionRequest), on_thread=True)
    )
    print(
        f"{len(raw) / 1e6:.1f} MB body: longest loop pause inline {inline * 1000:.0f} ms, on the thread {threaded * 1000:.0f} ms"
    )
    assert threaded < inline / 2, (inline, threaded)
    parsed = _parse_large(raw, JSON, CompletionRequest)
    assert parsed.model_extra is not None and len(parsed.model_extra["metadata"]) == 100_000
