"""The instance's HTTP server: the OpenAI app (splitwise/api) on uvicorn, in the instance's loop,
plus a task that copies engine/transfer figures into the Prometheus gauges."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import uvicorn

from splitwise.api.app import create_app
from splitwise.api.metrics import ApiMetrics
from splitwise.logging import get_logger
from splitwise.transfer.base import TransportInitiator, TransportTarget

if TYPE_CHECKING:
    from splitwise.instance.instance import Instance

log = get_logger(__name__)

_METRICS_REFRESH_S = 1.0


async def start_http_server(
    instance: Instance, sock: socket.socket
) -> tuple[Any, asyncio.Task[None], int | None]:
    """Serve the app on ``sock``; returns (uvicorn server, its task, metrics port or None)."""
    assert instance.engine is not None
    engine = instance.engine
    metrics = instance.metrics
    metrics.add_counters_source(
        "splitwise_transfer_events",
        instance.counters.snapshot,
        "P/D transfer events (transfers_ok, transfer_failures, fallbacks, reserve_waits, ...) and "
        "drain / role switch events (drains_started, requests_handed_back, role_switches, ...).",
    )
    # Read at every scrape: a role switch replaces the transports, the channel and the node agent.
    if instance.config.scheduler.scheduler_name != "local":  # a role switch may add transports
        metrics.add_counters_source(
            "splitwise_kv_transport_events",
            lambda: _transport_counters(instance),
            "KV transport events by protocol (ipc_requests_begun, tcp_bytes_received, tcp_transfers_done, ...).",
        )
        metrics.add_counters_source(
            "splitwise_pd_control_events",
            lambda: instance.channel.server.counters.snapshot() if instance.channel is not None else {},
            "P/D control channel events (connections_accepted, refused_auth, refused_incompatible, ...).",
        )
    for name, attr in (
        ("splitwise_scheduler_frontend_events", "frontend"),
        ("splitwise_scheduler_node_events", "node"),
    ):
        if hasattr(getattr(getattr(instance, attr), "stats", None), "snapshot"):
            metrics.add_counters_source(
                name,
                functools.partial(_side_counters, instance, attr),
                "Scheduler events (submitted, redispatched, expired, ...).",
            )
    geometry = engine.kv_cache.geometry
    metrics.set_cache_config(
        {
            "block_size": str(geometry.block_size),
            "num_gpu_blocks": str(geometry.num_blocks),
            "cache_dtype": geometry.dtype,
            "enable_prefix_caching": str(engine.config.enable_prefix_caching),
        }
    )
    app = create_app(
        frontend=instance.frontend,
        tokenizer=engine.tokenizer,
        model_id=instance.config.model_id,
        max_model_len=engine.max_model_len,
        is_ready=instance.is_ready,
        health_state=instance.health_state,
        metrics=metrics,
        api_key=instance.config.api_key,
        max_request_bytes=instance.config.max_request_bytes,
        tool_call_parser=instance.config.tool_call_parser,
        eos_token_ids=sorted(engine.stop_checker.eos_token_ids),
    )
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5
    )
    server = _Server(config)
    # The instance owns SIGINT/SIGTERM (serve.py: SIGTERM drains, SIGINT stops): uvicorn must not
    # capture them. Shutdown sets should_exit: HTTP stops first, then scheduler, transports, engine.
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name="http")
    asyncio.get_running_loop().create_task(_refresh_metrics(instance, metrics), name="metrics-refresh")
    metrics_port = None
    if instance.config.metrics_port is not None:
        from prometheus_client import start_http_server as start_metrics

        start_metrics(instance.config.metrics_port, addr=instance.config.host, registry=metrics.registry)
        metrics_port = instance.config.metrics_port
    while not server.started:
        if task.done():
            task.result()  # raises the start-up error
            raise RuntimeError("HTTP server stopped during start-up")
        await asyncio.sleep(0.01)
    return server, task, metrics_port


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the instance's own signal handlers stay installed


def _side_counters(instance: Instance, attr: str) -> dict[str, int]:
    stats = getattr(getattr(instance, attr), "stats", None)
    return dict(stats.snapshot()) if stats is not None else {}


def _transport_counters(instance: Instance) -> dict[str, int]:
    transports: list[TransportTarget | TransportInitiator] = [
        *instance.targets.values(),
        *instance.initiators.values(),
    ]
    return {f"{t.protocol}_{event}": n for t in transports for event, n in t.counters.snapshot().items()}


async def _refresh_metrics(instance: Instance, metrics: ApiMetrics) -> None:
    assert instance.worker is not None and instance.engine is not None
    stats = instance.engine.stats
    last_prompt, last_cached, last_redispatched, last_preemptions = 0, 0, 0, 0
    frontend_stats = getattr(instance.frontend, "stats", None)
    while True:
        if frontend_stats is not None:
            redispatched = frontend_stats.get("redispatched")
            if redispatched > last_redispatched:
                metrics.redispatches.inc(redispatched - last_redispatched)
                last_redispatched = redispatched
        load = instance.worker.load
        waiting_for_blocks = instance.decode_flow.num_waiting_for_blocks if instance.decode_flow else 0
        metrics.vllm_num_requests_running.set(load.running_requests)
        # As vLLM counts a decode request waiting for its remote KV as waiting: ours wait for blocks.
        metrics.vllm_num_requests_waiting.set(load.waiting_requests + waiting_for_blocks)
        metrics.vllm_kv_cache_usage.set(load.kv_usage)
        metrics.vllm_gpu_cache_usage.set(load.kv_usage)
        metrics.num_requests_waiting_for_kv_blocks.set(waiting_for_blocks)
        metrics.num_requests_running.set(load.running_requests)
        metrics.num_requests_waiting.set(load.waiting_requests + waiting_for_blocks)
        metrics.queued_prefill_tokens.set(load.queued_prefill_tokens)
        metrics.kv_blocks_total.set(load.total_kv_blocks)
        metrics.kv_blocks_used.set(load.total_kv_blocks - load.free_kv_blocks)
        metrics.kv_cache_usage.set(load.kv_usage)
        prompt, cached = stats.num_prompt_tokens, stats.num_cached_prompt_tokens
        if prompt > last_prompt:
            metrics.record_prefix_cache_lookup(
                queried_tokens=prompt - last_prompt, hit_tokens=max(0, cached - last_cached)
            )
            last_prompt, last_cached = prompt, cached
        if stats.num_preemptions > last_preemptions:
            metrics.num_preemptions.inc(stats.num_preemptions - last_preemptions)
            last_preemptions = stats.num_preemptions
        await asyncio.sleep(_METRICS_REFRESH_S)
