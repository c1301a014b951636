"""Frozen, validated configuration of one router process (``splitwise router``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from scheduler.config import SchedulerConfig


@dataclass(frozen=True)
class RouterConfig:
    """What a router needs: the model's tokenizer directory (to tokenize and render chat templates
    exactly as the instances would), the id clients send, the Redis scheduler, its listener."""

    model: str  # a Hugging Face model directory: tokenizer files and config.json are read
    scheduler: SchedulerConfig
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    api_key: str | None = None
    max_request_bytes: int = 8 * 1024 * 1024  # HTTP bodies above this are a 413 before parsing
    tool_call_parser: str | None = None
    frontend_id: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port: {self.port} is not a TCP port")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"--max-model-len: {self.max_model_len} must be >= 1")
        if self.max_request_bytes < 1:
            raise ValueError(f"--max-request-bytes: {self.max_request_bytes} must be >= 1")
        if self.scheduler.scheduler_name != "splitwise":
            raise ValueError("--scheduler-name: a router dispatches through Redis (splitwise), not local")

    @property
    def model_id(self) -> str:
        """The same id the instances register with (``InstanceConfig.model_id``): requests pair by it."""
        return self.served_model_name or os.path.basename(os.path.normpath(self.model))
