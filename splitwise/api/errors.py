"""HTTP errors in OpenAI's shape, and the API server's one error boundary.

Every error response body is ``{"error": {"message", "type", "param", "code"}}``. Inner code raises
an ``ApiError`` subclass (or an engine ``InvalidRequestError``, which is bad input by definition);
the handlers installed by ``install_error_handlers`` render it, count it in
``splitwise_requests_total{outcome=...}`` and log it. Anything else that escapes a route is a bug:
it is logged with its traceback, counted as ``internal_error`` and answered with a 500 -- bad input
must never get there.

| status | class             | outcome label     | when                                          |
|--------|-------------------|-------------------|-----------------------------------------------|
| 400    | BadRequestError   | invalid_request   | bad JSON, wrong types, bad values, too long   |
| 401    | AuthenticationError | unauthorized    | --api-key set and the bearer key is wrong     |
| 404    | NotFoundError     | not_found         | unknown model (or route)                      |
| 503    | UnavailableError  | no_capacity       | no prefill/decode pair, scheduler unreachable |
| 504    | ExpiredError      | expired           | the request outlived --scheduler-ttl          |
| 500    | BackendError      | failed            | a node reported a non-retryable failure       |
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from splitwise.api.metrics import ApiMetrics, endpoint_label
from splitwise.api.protocol import ErrorInfo, ErrorResponse
from splitwise.engine.errors import InvalidRequestError
from splitwise.errors import SplitwiseError
from splitwise.logging import get_logger

log = get_logger("splitwise.api")


class ApiError(SplitwiseError):
    """Root of the errors the API answers on purpose; each knows its status and renders itself."""

    status_code: int = 500
    error_type: str = "internal_error"
    outcome: str = "failed"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_body(self) -> dict[str, Any]:
        info = ErrorInfo(message=self.message, type=self.error_type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def to_response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status_code == 401 else None
        return JSONResponse(self.to_body(), status_code=self.status_code, headers=headers)


class BadRequestError(ApiError):
    status_code = 400
    error_type = "invalid_request_error"
    outcome = "invalid_request"


class AuthenticationError(ApiError):
    status_code = 401
    error_type = "authentication_error"
    outcome = "unauthorized"


class NotFoundError(ApiError):
    status_code = 404
    error_type = "not_found_error"
    outcome = "not_found"


class UnavailableError(ApiError):
    status_code = 503
    error_type = "service_unavailable"
    outcome = "no_capacity"
    retryable = True


class ExpiredError(ApiError):
    status_code = 504
    error_type = "timeout"
    outcome = "expired"
    retryable = True


class BackendError(ApiError):
    status_code = 500
    error_type = "internal_error"
    outcome = "failed"


class ClientDisconnectedError(ApiError):
    """The client went away before the answer was ready (nobody reads this response)."""

    status_code = 499
    error_type = "client_closed_request"
    outcome = "cancelled"


def as_api_error(exc: Exception) -> ApiError:
    """The HTTP meaning of an error raised while serving a request."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return BadRequestError(str(exc))
    return BackendError(f"internal error: {type(exc).__name__}")


def validation_error(exc: RequestValidationError) -> BadRequestError:
    """FastAPI's 422 as OpenAI's 400: the first problem, with the offending field as ``param``."""
    errors = exc.errors()
    if not errors:
        return BadRequestError("invalid request body")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return BadRequestError(
            f"request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
            code="invalid_json",
        )
    if not loc:  # the body itself: not an object, or not sent as application/json
        return BadRequestError(
            f"the request body must be a JSON object sent as application/json ({first['msg']})",
            code="invalid_body",
        )
    # Union members show up as extra loc parts ("prompt", "str"); the client named only "prompt".
    param = loc[0]
    for part in loc[1:]:
        if part.isdigit():
            param += f"[{part}]"
        elif part in {"str", "list[int]", "list[str]", "list[list[int]]", "int", "float", "bool"}:
            continue
        else:
            param += f".{part}"
    return BadRequestError(f"{param}: {first['msg']}", param=param)


def install_error_handlers(app: FastAPI, metrics: ApiMetrics) -> None:
    """The one error boundary of the API process: render, count, log."""

    def answer(request: Request, error: ApiError) -> JSONResponse:
        metrics.count_request(endpoint_label(request.url.path), error.outcome)
        level = "warning" if error.status_code < 500 else "error"
        getattr(log, level)(
            "request_rejected",
            path=request.url.path,
            status=error.status_code,
            error_type=error.error_type,
            param=error.param,
            message=error.message,
        )
        return error.to_response()

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        return answer(request, as_api_error(exc))

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return answer(request, validation_error(exc))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        cls: type[ApiError] = NotFoundError if exc.status_code == 404 else BadRequestError
        error = cls(str(exc.detail))
        error.status_code = exc.status_code  # e.g. 405 keeps its own status
        return answer(request, error)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        metrics.count_request(endpoint_label(request.url.path), "internal_error")
        log.error("request_crashed", path=request.url.path, exc_info=exc)
        return BackendError(f"internal error: {type(exc).__name__}").to_response()

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(InvalidRequestError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
