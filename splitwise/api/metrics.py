"""Prometheus metrics of one instance, served at GET /metrics.

Names and labels follow vLLM's (``vllm:*`` with a ``model_name`` label), so a stock vLLM Grafana
dashboard works on a splitwise instance; what only a P/D system has (KV transfer, fallbacks,
re-dispatch, decode's wait for KV blocks, per-node scheduler events) is ``splitwise_*``. Each
``ApiMetrics`` owns its registry (no process-global state, so tests can run several apps). The
``_created`` series are disabled process-wide (vLLM does the same): they double every counter and
histogram and no dashboard reads them.

Who updates what:
- the HTTP layer (the frontend that took the request): requests, prompt/generation tokens,
  TTFT / ITL / TPOT / E2E, in-flight;
- the engine worker, through ``splitwise.instance.request_stats`` (the node that ran the request):
  queue / prefill / decode / inference time, finish reasons, iteration tokens;
- the metrics refresh task (``splitwise.instance.http``): running / waiting, KV usage, prefix cache,
  preemptions, cache config;
- the P/D flows (``splitwise.instance.transfer_metrics``): transfer bytes, latency, failures, fallbacks.

Request latency as the HTTP server sees it, from the moment a request is submitted to the scheduler
(after validation and tokenization) -- so it covers queueing, prefill, KV transfer and delivery:
  TTFT  = first token received - request submitted
  ITL   = gap between successive token arrivals; a chunk of k tokens counts as k gaps of gap/k
  TPOT  = (last token - first token) / (completion tokens - 1), once per request with >= 2 tokens
  E2E   = request ended (finished, failed or abandoned) - request submitted
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

disable_created_metrics()  # type: ignore[no-untyped-call]

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
# Outcomes of requests_total; one per response, decided at the error boundary or the end of a stream.
OUTCOMES = (
    "success",
    "invalid_request",
    "too_large",
    "unauthorized",
    "not_found",
    "no_capacity",
    "expired",
    "cancelled",
    "failed",
    "internal_error",
)
# vllm:request_success_total{finished_reason}: the engine's reasons (vLLM's spelling).
FINISHED_REASONS = ("stop", "length", "abort")

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
    """Every metric family of an instance. The ``vllm:*`` ones are bound to this instance's
    ``model_name`` at construction, so callers use them without labels."""

    def __init__(self, registry: CollectorRegistry | None = None, *, model_name: str = "unknown") -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self._define_request_metrics()
        self._define_node_request_metrics()
        self._define_engine_metrics()
        self._define_transfer_metrics()
        self._prefix_queried_tokens = 0
        self._prefix_hit_tokens = 0

    def _counter(self, name: str, help_text: str) -> Counter:
        return Counter(name, help_text, ["model_name"], registry=self.registry).labels(
            model_name=self.model_name
        )

    def _gauge(self, name: str, help_text: str) -> Gauge:
        return Gauge(name, help_text, ["model_name"], registry=self.registry).labels(
            model_name=self.model_name
        )

    def _histogram(self, name: str, help_text: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(name, help_text, ["model_name"], buckets=buckets, registry=self.registry).labels(
            model_name=self.model_name
        )

    def _define_request_metrics(self) -> None:
        """Updated by the HTTP layer of the instance that accepted the request."""
        r = self.registry
        self.requests = Counter(
            "splitwise_requests",
            "HTTP requests answered, by endpoint and outcome.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "splitwise_requests_in_flight", "Generation requests accepted and not yet answered.", registry=r
        )
        self.time_to_first_token = self._histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            _LATENCY_BUCKETS_S,
        )
        self.inter_token_latency = self._histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            _LATENCY_BUCKETS_S,
        )
        self.time_per_output_token = self._histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds (per request, after the first token).",
            _LATENCY_BUCKETS_S,
        )
        self.request_time_per_output_token = self._histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            _LATENCY_BUCKETS_S,
        )
        self.e2e_latency = self._histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            _E2E_BUCKETS_S,
        )
        self.prompt_tokens = self._counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = self._counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        self.request_prompt_tokens = self._histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", _TOKEN_BUCKETS
        )
        self.request_generation_tokens = self._histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", _TOKEN_BUCKETS
        )

    def _define_node_request_metrics(self) -> None:
        """Updated by the engine worker of the node that ran the request (vLLM's request phases)."""
        self.request_queue_time = self._histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            _E2E_BUCKETS_S,
        )
        self.request_prefill_time = self._histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            _E2E_BUCKETS_S,
        )
        self.request_decode_time = self._histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            _E2E_BUCKETS_S,
        )
        self.request_inference_time = self._histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            _E2E_BUCKETS_S,
        )
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.request_success = {
            reason: success.labels(model_name=self.model_name, finished_reason=reason)
            for reason in FINISHED_REASONS
        }
        self.iteration_tokens = self._histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384),
        )

    def _define_engine_metrics(self) -> None:
        """Updated by the metrics refresh task from the engine worker's load snapshot."""
        r = self.registry
        self.vllm_num_requests_running = self._gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        )
        self.vllm_num_requests_waiting = self._gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed."
        )
        self.vllm_kv_cache_usage = self._gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        )
        self.vllm_gpu_cache_usage = self._gauge(
            "vllm:gpu_cache_usage_perc",
            "GPU KV-cache usage. 1 means 100 percent usage (vLLM's older name).",
        )
        self.vllm_prefix_cache_queries = self._counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.vllm_prefix_cache_hits = self._counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        self.num_preemptions = self._counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine."
        )
        self.cache_config_info = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig (value 1; the config is in the labels).",
            ["model_name", "block_size", "num_gpu_blocks", "cache_dtype", "enable_prefix_caching"],
            registry=r,
        )
        # splitwise's own views of the same engine (kept: the P/D tests and scheduler read them).
        self.num_requests_waiting = Gauge(
            "splitwise_num_requests_waiting",
            "Requests queued in the engine plus decode requests waiting for KV blocks.",
            registry=r,
        )
        self.num_requests_running = Gauge(
            "splitwise_num_requests_running", "Requests running in the engine.", registry=r
        )
        self.num_requests_waiting_for_kv_blocks = self._gauge(
            "splitwise_num_requests_waiting_for_kv_blocks",
            "Decode: requests waiting for free KV blocks to reserve before their remote prefill.",
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
        self.prefix_cache_hit_rate = Gauge(
            "splitwise_prefix_cache_hit_rate",
            "Prefix cache hits / queries, in tokens, since start (0..1).",
            registry=r,
        )

    def _define_transfer_metrics(self) -> None:
        """P/D only: updated by the prefill and decode flows."""
        r = self.registry
        self.kv_transfer_bytes = Counter(
            "splitwise_kv_transfer_bytes",
            "KV cache bytes transferred (direction: out on P, in on D).",
            ["model_name", "protocol", "direction"],
            registry=r,
        )
        self.kv_transfer_latency = Histogram(
            "splitwise_kv_transfer_latency_seconds",
            "P: one request's KV transfer, from its first layer write to D confirming every write "
            "landed (with layer pipelining this overlaps the compute of the later layers).",
            ["model_name", "protocol"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.kv_transfer_exposed = Histogram(
            "splitwise_kv_transfer_exposed_seconds",
            "P: transfer time not hidden behind compute, from the prefill's end to D confirming "
            "every write landed.",
            ["model_name", "protocol"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.remote_prefill_latency = Histogram(
            "splitwise_remote_prefill_latency_seconds",
            "D: from sending the prefill task to P to every layer landed (queue + prefill + transfer on P).",
            ["model_name", "protocol"],
            buckets=_E2E_BUCKETS_S,
            registry=r,
        )
        self.kv_transfer_failures = Counter(
            "splitwise_kv_transfer_failures",
            "KV transfers that failed.",
            ["model_name", "protocol", "reason"],
            registry=r,
        )
        self.kv_transfer_fallbacks = Counter(
            "splitwise_kv_transfer_fallbacks",
            "Transfers that fell back to another protocol or to a local prefill.",
            ["model_name", "from_protocol", "to_protocol"],
            registry=r,
        )
        self.redispatches = self._counter(
            "splitwise_redispatches", "Requests re-dispatched to another node pair."
        )

    # --- helpers ------------------------------------------------------------------------------------
    def count_request(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(endpoint=endpoint, outcome=outcome).inc()

    def record_prefix_cache_lookup(self, *, queried_tokens: int, hit_tokens: int) -> None:
        """Add one lookup's numbers and refresh the hit-rate gauge (for the runtime)."""
        self.vllm_prefix_cache_queries.inc(queried_tokens)
        self.vllm_prefix_cache_hits.inc(hit_tokens)
        self._prefix_queried_tokens += queried_tokens
        self._prefix_hit_tokens += hit_tokens
        if self._prefix_queried_tokens:
            self.prefix_cache_hit_rate.set(self._prefix_hit_tokens / self._prefix_queried_tokens)

    def set_cache_config(self, info: Mapping[str, str]) -> None:
        """vllm:cache_config_info: one series, value 1, the cache config in its labels."""
        self.cache_config_info.labels(model_name=self.model_name, **info).set(1)

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
            tpot = (self.last_token_s - self.first_token_s) / (self.num_tokens - 1)
            self.metrics.time_per_output_token.observe(tpot)
            self.metrics.request_time_per_output_token.observe(tpot)
