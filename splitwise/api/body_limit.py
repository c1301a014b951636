"""Request bodies are bounded before anything parses them (``--max-request-bytes``).

An ASGI middleware in front of every route: a declared ``Content-Length`` above the limit is a
413 at once, without reading a byte of the body; a body sent without one (chunked) is counted as
it arrives and cut with a 413 as soon as it passes the limit. Only a body within the limit
reaches the routes, whose ``body_parse`` parses and validates it (a large one on a thread, in a
way that leaves the loop running), so a 10 MB body cannot stall other streams or the heartbeats.
The answer has the OpenAI error shape (``{"error": {...}}``, type ``invalid_request_error``,
code ``request_too_large``) and is counted as ``splitwise_requests_total{outcome="too_large"}``.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from splitwise.api.metrics import ApiMetrics, endpoint_label

# 8 MiB: a prompt of a 128k-token context as text is ~0.5-1 MB and as token ids ~1 MB of JSON;
# 8 MiB leaves room for long chat histories and tool schemas, and parses in tens of ms.
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024


def too_large_body(limit_bytes: int, size: str) -> bytes:
    return json.dumps(
        {
            "error": {
                "message": f"request body is {size} bytes; this server accepts at most {limit_bytes} "
                "(--max-request-bytes)",
                "type": "invalid_request_error",
                "param": None,
                "code": "request_too_large",
            }
        }
    ).encode()


class BodyLimit:
    """ASGI middleware: bodies larger than ``max_bytes`` are answered 413 before they are parsed."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, metrics: ApiMetrics | None = None) -> None:
        if max_bytes < 1:
            raise ValueError(f"--max-request-bytes: {max_bytes} must be >= 1")
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send, declared.decode())
            return
        if declared is not None and declared.isdigit():
            # The server delivers at most Content-Length bytes (h11 enforces it): nothing to count.
            await self.app(scope, receive, send)
            return
        # No (usable) length: read the body here, within the limit, and replay it to the app.
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away while sending
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._refuse(scope, send, f"more than {self.max_bytes}")
                return
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _refuse(self, scope: Scope, send: Send, size: str) -> None:
        if self.metrics is not None:
            self.metrics.count_request(endpoint_label(scope.get("path", "")), "too_large")
        body = too_large_body(self.max_bytes, size)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the app the body read already, then waits on the real one (a streaming
    response listens there for the client's disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
