"""Prometheus metrics of one instance, served at GET /metrics.

Each ``ApiMetrics`` owns its registry (no process-global state, so tests can run several apps).
The HTTP layer updates the request metrics itself; the instance runtime updates the engine,
cache and transfer ones (they are defined here so every name lives in one place).

Request latency as the HTTP server sees it, from the moment a request is submitted to the scheduler
(after validation and tokenization) -- so it covers queueing, prefill, KV transfer and delivery:
  TTFT  = first token received - request submitted
  ITL   = gap between successive token arrivals; a chunk of k tokens counts as k gaps of gap/k
  TPOT  = (last token - first token) / (completion tokens - 1), once per request with >= 2 tokens
  E2E   = request ended (finished, failed or abandoned) - request submitted
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
# Outcomes of requests_total; one per response, decided at the error boundary or the end of a stream.
OUTCOMES = (
    "success",
    "invalid_request",
    "unauthorized",
    "not_found",
    "no_capacity",
    "expired",
    "cancelled",
    "failed",
    "internal_error",
)

_LATENCY_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 900.0)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def endpoint_label(path: str) -> str:
    """Known routes by name; everything else as ``other`` (random 404 paths must not make new series)."""
    return path if path in ENDPOINTS else "other"


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        # --- requests, updated by the HTTP layer -----------------------------------------------------
        self.requests = Counter(
            "splitwise_requests",
            "HTTP requests answered, by endpoint and outcome.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "splitwise_requests_in_flight", "Generation requests accepted and not yet answered.", registry=r
        )
        self.time_to_first_token = Histogram(
            "splitwise_time_to_first_token_seconds",
            "Request submission to its first generated token.",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "splitwise_inter_token_latency_seconds",
            "Gap between successive generated tokens.",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "splitwise_time_per_output_token_seconds",
            "Mean time per generated token after the first, per request.",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "splitwise_e2e_request_latency_seconds",
            "Request submission to the end of its response.",
            buckets=_E2E_BUCKETS_S,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "splitwise_prompt_tokens", "Prompt tokens of accepted requests.", registry=r
        )
        self.generation_tokens = Counter(
            "splitwise_generation_tokens", "Tokens generated for clients.", registry=r
        )
        self.request_prompt_tokens = Histogram(
            "splitwise_request_prompt_tokens",
            "Prompt length per request.",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.request_generation_tokens = Histogram(
            "splitwise_request_generation_tokens",
            "Completion length per finished request.",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        # --- engine and cache, updated by the instance runtime ---------------------------------------
        self.num_requests_waiting = Gauge(
            "splitwise_num_requests_waiting", "Requests queued in the engine.", registry=r
        )
        self.num_requests_running = Gauge(
            "splitwise_num_requests_running", "Requests running in the engine.", registry=r
        )
        self.queued_prefill_tokens = Gauge(
            "splitwise_queued_prefill_tokens",
            "Prompt tokens waiting for prefill on this instance.",
            registry=r,
        )
        self.kv_blocks_total = Gauge(
            "splitwise_kv_blocks_total", "KV cache blocks of this instance.", registry=r
        )
        self.kv_blocks_used = Gauge("splitwise_kv_blocks_used", "KV cache blocks in use.", registry=r)
        self.kv_cache_usage = Gauge(
            "splitwise_kv_cache_usage_ratio", "Used / total KV cache blocks (0..1).", registry=r
        )
        self.prefix_cache_queries = Counter(
            "splitwise_prefix_cache_queries_tokens",
            "Prompt tokens looked up in the prefix cache.",
            registry=r,
        )
        self.prefix_cache_hits = Counter(
            "splitwise_prefix_cache_hits_tokens", "Prompt tokens found in the prefix cache.", registry=r
        )
        self.prefix_cache_hit_rate = Gauge(
            "splitwise_prefix_cache_hit_rate",
            "Prefix cache hits / queries, in tokens, since start (0..1).",
            registry=r,
        )
        # --- P/D KV transfer and scheduling, updated by the instance runtime -------------------------
        self.kv_transfer_bytes = Counter(
            "splitwise_kv_transfer_bytes",
            "KV cache bytes transferred.",
            ["protocol", "direction"],
            registry=r,
        )
        self.kv_transfer_latency = Histogram(
            "splitwise_kv_transfer_latency_seconds",
            "Time to transfer one request's KV blocks.",
            ["protocol"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.kv_transfer_failures = Counter(
            "splitwise_kv_transfer_failures", "KV transfers that failed.", ["protocol", "reason"], registry=r
        )
        self.kv_transfer_fallbacks = Counter(
            "splitwise_kv_transfer_fallbacks",
            "Transfers that fell back to another protocol.",
            ["from_protocol", "to_protocol"],
            registry=r,
        )
        self.redispatches = Counter(
            "splitwise_redispatches", "Requests re-dispatched to another node pair.", registry=r
        )
        self._prefix_queried_tokens = 0
        self._prefix_hit_tokens = 0

    # --- helpers the HTTP layer uses ----------------------------------------------------------------
    def count_request(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(endpoint=endpoint, outcome=outcome).inc()

    def record_prefix_cache_lookup(self, *, queried_tokens: int, hit_tokens: int) -> None:
        """Add one lookup's numbers and refresh the hit-rate gauge (for the runtime)."""
        self.prefix_cache_queries.inc(queried_tokens)
        self.prefix_cache_hits.inc(hit_tokens)
        self._prefix_queried_tokens += queried_tokens
        self._prefix_hit_tokens += hit_tokens
        if self._prefix_queried_tokens:
            self.prefix_cache_hit_rate.set(self._prefix_hit_tokens / self._prefix_queried_tokens)

    def add_counters_source(
        self, prefix: str, snapshot: Callable[[], dict[str, int]], help_text: str
    ) -> None:
        """Export a ``Counters``-style snapshot (e.g. ``FrontendScheduler.stats.snapshot``) as
        ``<prefix>_total{event=...}``, read at scrape time."""
        self.registry.register(_SnapshotCollector(prefix, snapshot, help_text))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _SnapshotCollector(Collector):
    def __init__(self, name: str, snapshot: Callable[[], dict[str, int]], help_text: str) -> None:
        self._name, self._snapshot, self._help = name, snapshot, help_text

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._help, labels=["event"])
        for event, value in sorted(self._snapshot().items()):
            family.add_metric([event], value)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._help, labels=["event"])


@dataclass
class RequestTimer:
    """Token arrival times of one request; ``finish`` observes the latency histograms once."""

    metrics: ApiMetrics
    clock: Callable[[], float] = time.monotonic
    submitted_s: float = field(default=0.0)
    first_token_s: float | None = None
    last_token_s: float | None = None
    num_tokens: int = 0
    _finished: bool = False

    def __post_init__(self) -> None:
        self.submitted_s = self.clock()

    def on_tokens(self, count: int) -> None:
        if count <= 0:
            return
        now = self.clock()
        if self.last_token_s is None:
            self.first_token_s = now
            self.metrics.time_to_first_token.observe(now - self.submitted_s)
        else:
            gap = (now - self.last_token_s) / count
            for _ in range(count):
                self.metrics.inter_token_latency.observe(gap)
        self.last_token_s = now
        self.num_tokens += count

    def finish(self, *, completed: bool) -> None:
        """Observe E2E (and TPOT for requests that completed); idempotent."""
        if self._finished:
            return
        self._finished = True
        self.metrics.e2e_latency.observe(self.clock() - self.submitted_s)
        if not completed:
            return
        self.metrics.request_generation_tokens.observe(self.num_tokens)
        if self.num_tokens >= 2 and self.first_token_s is not None and self.last_token_s is not None:
            self.metrics.time_per_output_token.observe(
                (self.last_token_s - self.first_token_s) / (self.num_tokens - 1)
            )
