"""structlog configured once per process.

Console renderer when stderr is a TTY, JSON lines otherwise (what log shippers want).
Request ids are bound with ``bind_request(req_id)`` (contextvars), so every line a
request causes carries ``req_id`` without threading it through call signatures.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

_configured = False


def configure_logging(level: str = "INFO", *, json: bool | None = None) -> None:
    """Configure structlog and stdlib logging. Idempotent: later calls only change the level."""
    global _configured
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"--log-level: unknown level {level!r}")
    use_json = (not sys.stderr.isatty()) if json is None else json
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries that use stdlib logging (pyverbs calls basicConfig at import) go to stderr too.
    logging.basicConfig(
        level=numeric, stream=sys.stderr, force=True, format="%(levelname)s %(name)s: %(message)s"
    )
    _configured = True


def get_logger(name: str | None = None) -> Any:
    if not _configured:
        configure_logging()
    return structlog.get_logger(name) if name else structlog.get_logger()


@contextmanager
def bind_request(req_id: str, **extra: Any) -> Iterator[None]:
    """Bind ``req_id`` (and extra fields) to every log line emitted inside the block."""
    with structlog.contextvars.bound_contextvars(req_id=req_id, **extra):
        yield
