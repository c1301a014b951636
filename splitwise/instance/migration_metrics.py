"""Prometheus families of live migration (#16), on the instance's registry (served on /metrics).

    splitwise_migrations_started_total{reason}            a migration out of this node began
    splitwise_migrations_completed_total{reason}          the target owns the request now
    splitwise_migrations_failed_total{reason}             the request stayed here (or ended here)
    splitwise_migration_pause_seconds                     paused in the source engine until the
                                                          target acknowledged the commit
    splitwise_migration_blocks_total                      KV blocks copied (all rounds)

``reason`` is the trigger: manual (``splitwise migrate``), drain, balance, make_room.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from splitwise.api.metrics import ApiMetrics
from splitwise.instance.migration_state import MigrationOutcome

PAUSE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class MigrationMetrics:
    def __init__(self, metrics: ApiMetrics) -> None:
        registry, model = metrics.registry, metrics.model_name
        labels = ["model_name", "reason"]
        self.model_name = model
        self.started = Counter(
            "splitwise_migrations_started", "Live migrations out begun.", labels, registry=registry
        )
        self.completed = Counter(
            "splitwise_migrations_completed", "Live migrations out committed.", labels, registry=registry
        )
        self.failed = Counter(
            "splitwise_migrations_failed",
            "Live migrations out that left the request here.",
            labels,
            registry=registry,
        )
        self.pause_s = Histogram(
            "splitwise_migration_pause_seconds",
            "Time a migrating request was paused in the source engine until the target committed.",
            ["model_name"],
            buckets=PAUSE_BUCKETS_S,
            registry=registry,
        ).labels(model_name=model)
        self.blocks = Counter(
            "splitwise_migration_blocks",
            "KV blocks copied by live migrations.",
            ["model_name"],
            registry=registry,
        ).labels(model_name=model)

    def observe(self, outcome: MigrationOutcome) -> None:
        """One migration ended (``MigrationSource.on_outcome``)."""
        self.started.labels(model_name=self.model_name, reason=outcome.reason).inc()
        family = self.completed if outcome.ok else self.failed
        family.labels(model_name=self.model_name, reason=outcome.reason).inc()
        self.blocks.inc(outcome.num_blocks)
        if outcome.ok:
            self.pause_s.observe(outcome.pause_ms / 1000)
