"""The OpenAI-compatible HTTP app of one instance (mounted by ``splitwise serve``).

Routes:
  POST /v1/completions, POST /v1/chat/completions   generation (SSE when "stream": true)
  GET  /v1/models                                    the one served model
  POST /tokenize, POST /detokenize                   vLLM's tokenizer endpoints
  GET  /version                                      {"version": ...}
  GET|POST /ping, GET /health                        200 when ``is_ready()``, else 503
  GET  /metrics                                      Prometheus text (``ApiMetrics``)

``X-Request-Id``: when a client sends one, the request id is ``<cmpl|chatcmpl>-<X-Request-Id>`` (in
the response ``id`` and every log line about the request, on every node) and the header is echoed.

With ``api_key`` set, the /v1 routes and /tokenize, /detokenize need ``Authorization: Bearer
<api_key>``; /health, /ping, /version and /metrics stay open for probes and scrapers, and /docs,
/redoc, /openapi.json are disabled (404). Bodies above ``max_request_bytes`` are a 413 before parsing. The app does not start or stop the backend: the caller owns
its lifecycle (start it before serving, close it after).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from splitwise.api.body_limit import DEFAULT_MAX_REQUEST_BYTES, BodyLimit
from splitwise.api.chat import create_chat_completion, render_chat
from splitwise.api.completions import create_completion
from splitwise.api.errors import AuthenticationError, BadRequestError, install_error_handlers
from splitwise.api.metrics import ApiMetrics
from splitwise.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from splitwise.api.request_params import GrammarCheck
from splitwise.api.serving import REQUEST_ID_HEADER, FrontendBackend, ServingContext
from splitwise.api.text_checks import check_text, longest_token_chars
from splitwise.api.tools import TOOL_CALL_PARSERS
from splitwise.engine.stop_checker import StopChecker
from splitwise.engine.tokenizer import Tokenizer


class EchoRequestId:
    """ASGI middleware: every response carries the X-Request-Id the request came with."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = REQUEST_ID_HEADER.lower().encode()
        given = next((v for k, v in scope.get("headers", ()) if k == header), None)
        if given is None:
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (header, given)]
            await send(message)

        await self.app(scope, receive, send_with_id)


def _version() -> str:
    try:
        return version("splitwise")
    except PackageNotFoundError:
        return "unknown"


def _auth_dependency(api_key: str | None) -> Callable[[Request], None]:
    expected = f"Bearer {api_key}".encode() if api_key else None

    def check_api_key(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise AuthenticationError(
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    return check_api_key


def create_app(
    *,
    frontend: FrontendBackend,
    tokenizer: Tokenizer,
    model_id: str,
    max_model_len: int,
    is_ready: Callable[[], bool],
    health_state: Callable[[], str] | None = None,  # /health's status word (default ok/starting)
    metrics: ApiMetrics | None = None,
    api_key: str | None = None,
    eos_token_ids: Iterable[int] | None = None,
    tool_call_parser: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    """Build the app. ``eos_token_ids`` defaults to the tokenizer's (pass the engine's when it adds more);
    ``metrics`` defaults to a fresh registry (pass the runtime's to share engine gauges)."""
    if max_model_len < 1:
        raise ValueError(f"--max-model-len: {max_model_len} must be >= 1")
    if api_key is not None and not api_key:
        raise ValueError("--api-key: must not be empty")
    if tool_call_parser is not None and tool_call_parser not in TOOL_CALL_PARSERS:
        raise ValueError(
            f"--tool-call-parser: {tool_call_parser!r} is not one of {', '.join(TOOL_CALL_PARSERS)}"
        )
    metrics = metrics if metrics is not None else ApiMetrics(model_name=model_id)
    eos = tuple(tokenizer.eos_token_ids if eos_token_ids is None else eos_token_ids)
    ctx = ServingContext(
        backend=frontend,
        tokenizer=tokenizer,
        model_id=model_id,
        max_model_len=max_model_len,
        stop_checker=StopChecker(eos_token_ids=eos, max_model_len=max_model_len),
        metrics=metrics,
        grammar=GrammarCheck(tokenizer),
        tool_call_parser=tool_call_parser,
        max_prompt_chars=max_model_len * longest_token_chars(tokenizer),
    )
    # With --api-key the interactive docs and the schema are off: they would be the only /v1-level
    # information open to anyone (health, ping, version and metrics stay open for probes).
    public_docs = api_key is None
    app = FastAPI(
        title="splitwise",
        summary="OpenAI-compatible API of a splitwise instance",
        docs_url="/docs" if public_docs else None,
        redoc_url="/redoc" if public_docs else None,
        openapi_url="/openapi.json" if public_docs else None,
    )
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes, metrics=metrics)
    app.add_middleware(EchoRequestId)
    app.state.serving = ctx
    install_error_handlers(app, metrics)
    authorized = [Depends(_auth_dependency(api_key))]

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await create_completion(ctx, request, body)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        return await create_chat_completion(ctx, request, body)

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> JSONResponse:
        card = ModelCard(id=model_id, max_model_len=max_model_len)
        metrics.count_request("/v1/models", "success")
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.post("/tokenize", dependencies=authorized)
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise BadRequestError("send exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            ids = render_chat(ctx, body.messages, add_generation_prompt=body.add_generation_prompt)
        else:
            assert body.prompt is not None
            check_text(body.prompt, "prompt", max_chars=ctx.max_prompt_chars)
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        out: dict[str, object] = {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = [ctx.token_text(t) for t in ids]
        metrics.count_request("/tokenize", "success")
        return JSONResponse(out)

    @app.post("/detokenize", dependencies=authorized)
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        ctx.check_model(body.model)
        ctx.check_token_ids(body.tokens, "tokens")
        metrics.count_request("/detokenize", "success")
        return JSONResponse({"prompt": tokenizer.decode(body.tokens)})

    @app.get("/version")
    async def server_version() -> JSONResponse:
        return JSONResponse({"version": _version()})

    @app.get("/health")
    async def health() -> Response:
        ready = is_ready()
        metrics.count_request("/health", "success" if ready else "no_capacity")
        state = health_state() if health_state is not None else ("ok" if ready else "starting")
        return JSONResponse({"status": state}, status_code=200 if ready else 503)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:
        ready = is_ready()
        return Response(status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app
