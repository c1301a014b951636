"""Feeds P/D transfer outcomes into the instance's Prometheus metrics (splitwise/api/metrics.py)."""

from __future__ import annotations

from splitwise.api.metrics import ApiMetrics
from splitwise.engine.kv_cache import KVCacheGeometry


class TransferMetrics:
    def __init__(self, metrics: ApiMetrics, geometry: KVCacheGeometry) -> None:
        self.metrics = metrics
        self.geometry = geometry
        self._model = metrics.model_name

    def request_bytes(self, num_blocks: int) -> int:
        """Bytes one request moves: its blocks, K and V, every layer."""
        return num_blocks * self.geometry.bytes_per_block * 2 * self.geometry.num_layers

    def landed(self, protocol: str, seconds: float, num_blocks: int) -> None:
        """D: every layer of a request landed; ``seconds`` from sending the task to P to P's
        result (P's queue and prefill included, so it is not the transfer latency)."""
        self.metrics.remote_prefill_latency.labels(model_name=self._model, protocol=protocol).observe(seconds)
        self.metrics.kv_transfer_bytes.labels(model_name=self._model, protocol=protocol, direction="in").inc(
            self.request_bytes(num_blocks)
        )

    def shipped(self, protocol: str, num_blocks: int, *, transfer_s: float | None, exposed_s: float) -> None:
        """P: D confirmed a request's blocks landed. ``transfer_s``: from the first layer write to
        that confirmation (None when no write was issued); ``exposed_s``: from the end of the
        prefill to that confirmation (the part of the transfer not hidden behind compute)."""
        labels = {"model_name": self._model, "protocol": protocol}
        if transfer_s is not None:
            self.metrics.kv_transfer_latency.labels(**labels).observe(transfer_s)
        self.metrics.kv_transfer_exposed.labels(**labels).observe(exposed_s)
        self.metrics.kv_transfer_bytes.labels(**labels, direction="out").inc(self.request_bytes(num_blocks))

    def failed(self, protocol: str, reason: str) -> None:
        self.metrics.kv_transfer_failures.labels(
            model_name=self._model, protocol=protocol, reason=reason
        ).inc()

    def fell_back(self, protocol: str) -> None:
        """D prefilled locally after the remote prefill failed."""
        self.metrics.kv_transfer_fallbacks.labels(
            model_name=self._model, from_protocol=protocol, to_protocol="local"
        ).inc()
