"""The OpenAI-compatible HTTP app of one instance (mounted by ``splitwise serve``).

Routes:
  POST /v1/completions, POST /v1/chat/completions   generation (SSE when "stream": true)
  GET  /v1/models                                    the one served model
  GET  /health                                       200 when ``is_ready()``, else 503
  GET  /metrics                                      Prometheus text (``ApiMetrics``)

With ``api_key`` set, the /v1 routes need ``Authorization: Bearer <api_key>`` (health and metrics
stay open for probes and scrapers). The app does not start or stop the backend: the caller owns
its lifecycle (start it before serving, close it after).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from splitwise.api.chat import create_chat_completion
from splitwise.api.completions import create_completion
from splitwise.api.errors import AuthenticationError, install_error_handlers
from splitwise.api.metrics import ApiMetrics
from splitwise.api.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from splitwise.api.serving import FrontendBackend, ServingContext
from splitwise.engine.stop_checker import StopChecker
from splitwise.engine.tokenizer import Tokenizer


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
    metrics: ApiMetrics | None = None,
    api_key: str | None = None,
    eos_token_ids: Iterable[int] | None = None,
) -> FastAPI:
    """Build the app. ``eos_token_ids`` defaults to the tokenizer's (pass the engine's when it adds more);
    ``metrics`` defaults to a fresh registry (pass the runtime's to share engine gauges)."""
    if max_model_len < 1:
        raise ValueError(f"--max-model-len: {max_model_len} must be >= 1")
    if api_key is not None and not api_key:
        raise ValueError("--api-key: must not be empty")
    metrics = metrics if metrics is not None else ApiMetrics(model_name=model_id)
    eos = tuple(tokenizer.eos_token_ids if eos_token_ids is None else eos_token_ids)
    ctx = ServingContext(
        backend=frontend,
        tokenizer=tokenizer,
        model_id=model_id,
        max_model_len=max_model_len,
        stop_checker=StopChecker(eos_token_ids=eos, max_model_len=max_model_len),
        metrics=metrics,
    )
    app = FastAPI(title="splitwise", summary="OpenAI-compatible API of a splitwise instance")
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

    @app.get("/health")
    async def health() -> Response:
        ready = is_ready()
        metrics.count_request("/health", "success" if ready else "no_capacity")
        return JSONResponse({"status": "ok" if ready else "starting"}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app
