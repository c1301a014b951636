"""The OpenAI-compatible HTTP API of a splitwise instance (FastAPI app; uvicorn serves it)."""

from __future__ import annotations

from splitwise.api.app import create_app
from splitwise.api.metrics import ApiMetrics
from splitwise.api.serving import FrontendBackend

__all__ = ["ApiMetrics", "FrontendBackend", "create_app"]
