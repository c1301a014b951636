"""One router process: the OpenAI app of splitwise/api over a scheduler frontend, and no engine.

    start: model config + tokenizer -> FrontendScheduler (Redis) -> HTTP server
    stop:  HTTP -> frontend (requests still in flight end with ``scheduler_closed``)

The router is stateless beyond the requests in flight: every decision lives in Redis (the same
atomic dispatch script the instances' frontends run), so several routers can stand behind any HTTP
load balancer. A router that dies takes its clients' connections with it (they see a connection
error and may retry); the nodes serving its requests abort them once its lease stayed lapsed
(``orphans_aborted``), so nothing it started keeps running.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn

from scheduler.frontend import FrontendScheduler
from splitwise.api.app import create_app
from splitwise.api.metrics import ApiMetrics
from splitwise.engine.config import ModelConfig
from splitwise.engine.tokenizer import Tokenizer
from splitwise.logging import get_logger
from splitwise.router.config import RouterConfig

log = get_logger("splitwise.router")


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = ApiMetrics(model_name=config.model_id)
        self.frontend: FrontendScheduler | None = None
        self.port = 0
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    async def start(self, sock: socket.socket) -> None:
        """Serve on ``sock`` (bound by the caller, so the port is known before start-up ends)."""
        cfg = self.config
        model = ModelConfig.from_dir(cfg.model)
        max_model_len = cfg.max_model_len or model.max_position_embeddings
        if max_model_len > model.max_position_embeddings:
            raise ValueError(
                f"--max-model-len: {max_model_len} exceeds the model's max_position_embeddings "
                f"({model.max_position_embeddings})"
            )
        tokenizer = Tokenizer.from_dir(cfg.model)
        eos = sorted(set(tokenizer.eos_token_ids) | set(model.eos_token_ids))  # as LLMEngine's
        # kv=None: any KV geometry of this model; dispatch prefers the largest compatible group.
        self.frontend = FrontendScheduler(
            cfg.scheduler, model_id=cfg.model_id, kv=None, frontend_id=cfg.frontend_id
        )
        await self.frontend.start()
        self.metrics.add_counters_source(
            "splitwise_scheduler_frontend_events",
            self.frontend.stats.snapshot,
            "Scheduler events (submitted, redispatched, expired, ...).",
        )
        app = create_app(
            frontend=self.frontend,
            tokenizer=tokenizer,
            model_id=cfg.model_id,
            max_model_len=max_model_len,
            is_ready=self.is_ready,
            metrics=self.metrics,
            api_key=cfg.api_key,
            max_request_bytes=cfg.max_request_bytes,
            tool_call_parser=cfg.tool_call_parser,
            eos_token_ids=eos,
        )
        uv = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5
        )
        self._server = uvicorn.Server(uv)
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]), name="http")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        log.info("router ready", frontend_id=self.frontend.frontend_id, model=cfg.model_id, port=self.port)

    def is_ready(self) -> bool:
        return self.frontend is not None and not self._stopped.is_set()

    def request_stop(self) -> None:
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def close(self) -> None:
        self._stopped.set()
        if self._server is not None:
            self._server.should_exit = True
            if self._task is not None:
                await asyncio.gather(self._task, return_exceptions=True)
        if self.frontend is not None:
            try:
                await asyncio.wait_for(self.frontend.close(), 5.0)
            except (Exception, asyncio.TimeoutError) as exc:  # noqa: BLE001 - best effort at shutdown
                log.warning("router frontend close failed", error=str(exc) or type(exc).__name__)
        log.info("router stopped")
