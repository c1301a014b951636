"""One streamed request to an OpenAI-compatible server, timed chunk by chunk.

The request body asks for a stream with usage (``stream_options.include_usage``), so the output
token count is the server's own; a server that sends no usage is credited one token per text chunk.
With ``ignore_eos`` (vLLM's extension, on by default in ``splitwise bench serve``) the server
generates exactly ``max_tokens`` tokens, so every run of a workload does the same work.

Failures never raise: an HTTP error status, an ``{"error": ...}`` event, a broken connection or a
timeout all come back as a ``RequestResult`` with ``success=False`` and the reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from splitwise.bench.dataset import SampleRequest
from splitwise.bench.metrics import RequestResult

ENDPOINT_PATHS = {"completions": "/completions", "chat": "/chat/completions"}
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class RequestOptions:
    endpoint: str  # "completions" | "chat"
    model: str
    ignore_eos: bool = True
    temperature: float = 0.0


def request_body(sample: SampleRequest, options: RequestOptions) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": options.model,
        "max_tokens": sample.output_tokens,
        "temperature": options.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if options.ignore_eos:
        body["ignore_eos"] = True
    if options.endpoint == "chat":
        if not isinstance(sample.prompt, str):
            raise ValueError(
                "--endpoint chat: prompts must be text (token-id prompts need --endpoint completions)"
            )
        body["messages"] = [{"role": "user", "content": sample.prompt}]
    else:
        body["prompt"] = sample.prompt
    return body


def chunk_text(event: dict[str, Any], endpoint: str) -> str:
    """The output text one stream event carries ('' for role, finish and usage events)."""
    choices = event.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    if endpoint == "chat":
        delta = choice.get("delta") or {}
        return str(delta.get("content") or "")
    return str(choice.get("text") or "")


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """JSON payloads of ``data:`` lines until ``data: [DONE]`` (other SSE fields are skipped)."""
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if not isinstance(event, dict):
            raise ValueError(f"stream event is not a JSON object: {data[:MAX_ERROR_CHARS]}")
        yield event


def _error_text(event: dict[str, Any]) -> str:
    error = event["error"]
    message = error.get("message", error) if isinstance(error, dict) else error
    return f"server error event: {message}"[:MAX_ERROR_CHARS]


async def send_request(
    client: httpx.AsyncClient, base_url: str, sample: SampleRequest, options: RequestOptions
) -> RequestResult:
    """Send one streamed request and time it (see the module doc); never raises for server failures."""
    result = RequestResult(prompt_tokens=sample.prompt_tokens)
    url = base_url.rstrip("/") + ENDPOINT_PATHS[options.endpoint]
    body = request_body(sample, options)
    num_text_chunks = 0
    usage_tokens: int | None = None
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text}"[:MAX_ERROR_CHARS]
                return result
            async for event in sse_events(response.aiter_lines()):
                now = time.perf_counter() - start
                if "error" in event:
                    result.error = _error_text(event)
                    return result
                usage = event.get("usage")
                if isinstance(usage, dict):
                    usage_tokens = int(usage.get("completion_tokens", 0))
                    result.prompt_tokens = int(usage.get("prompt_tokens", result.prompt_tokens))
                if not chunk_text(event, options.endpoint):
                    continue
                if result.ttft_s is None:
                    result.ttft_s = now
                else:
                    result.itl_s.append(now - (result.last_token_s or 0.0))
                result.last_token_s = now
                num_text_chunks += 1
    except (httpx.HTTPError, ValueError) as exc:  # transport failures, timeouts, malformed events
        result.error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        return result
    result.e2e_s = time.perf_counter() - start
    result.output_tokens = usage_tokens if usage_tokens is not None else num_text_chunks
    if result.ttft_s is None:
        result.error = "the stream ended without output text"
        return result
    result.success = True
    return result
