"""Feeds P/D transfer outcomes into the instance's Prometheus metrics (splitwise/api/metrics.py)."""

from __future__ import annotations

from splitwise.api.metrics import ApiMetrics
from splitwise.engine.kv_cache import KVCacheGeometry


class TransferMetrics:
    def __init__(self, metrics: ApiMetrics, geometry: KVCacheGeometry) -> None:
        self.metrics = metrics
        self.geometry = geometry

    def request_bytes(self, num_blocks: int) -> int:
        """Bytes one request moves: its blocks, K and V, every layer."""
        return num_blocks * self.geometry.bytes_per_block * 2 * self.geometry.num_layers

    def landed(self, protocol: str, seconds: float, num_blocks: int) -> None:
        """D: every layer of a request landed (from sending the task to P to P's result)."""
        self.metrics.kv_transfer_latency.labels(protocol=protocol).observe(seconds)
        self.metrics.kv_transfer_bytes.labels(protocol=protocol, direction="in").inc(
            self.request_bytes(num_blocks)
        )

    def shipped(self, protocol: str, num_blocks: int) -> None:
        """P: D confirmed a request's blocks landed."""
        self.metrics.kv_transfer_bytes.labels(protocol=protocol, direction="out").inc(
            self.request_bytes(num_blocks)
        )

    def failed(self, protocol: str, reason: str) -> None:
        self.metrics.kv_transfer_failures.labels(protocol=protocol, reason=reason).inc()

    def fell_back(self, protocol: str) -> None:
        """D prefilled locally after the remote prefill failed."""
        self.metrics.kv_transfer_fallbacks.labels(from_protocol=protocol, to_protocol="local").inc()
