"""The planner's loop: read -> decide -> act -> record, once per ``interval_s``.

It runs on its own thread with a blocking Redis client (`splitwise planner`, or a thread of
`splitwise up --planner`); it owns the policy state. This loop is the planner's error boundary: a
Redis error or a failed action is logged, counted and recorded, and the next interval tries again
(the policy's pending change times out, so a lost action is not waited for forever).
"""

from __future__ import annotations

import threading
import uuid
from typing import Protocol

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge

from scheduler.clock import SYSTEM_CLOCK, Clock
from scheduler.keys import KeySchema
from splitwise.codes import Role
from splitwise.logging import get_logger
from splitwise.planner import PlannerError
from splitwise.planner.policy import Decision, Kind, PlannerState, PolicyConfig, Signals, decide
from splitwise.planner.record import record_decision, record_state
from splitwise.planner.signals import read_signals

log = get_logger(__name__)


class Actuator(Protocol):
    """Carries out one action. Called on the planner's thread; may block (a drain takes up to its
    grace period). Raises on failure (the loop records ``failed: <error>``)."""

    def switch(self, node_id: str, role: Role, *, reason: str) -> None: ...
    def add(self, role: Role, *, reason: str) -> str: ...  # the new node's id
    def remove(self, node_id: str, *, reason: str) -> None: ...


class PlannerMetrics:
    """``splitwise_planner_decisions_total{kind}`` (holds included: one per interval),
    ``splitwise_planner_action_failures_total{kind}``, ``splitwise_planner_nodes{role}``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.decisions = Counter(
            "splitwise_planner_decisions", "Planner decisions by kind.", ["kind"], registry=self.registry
        )
        self.failures = Counter(
            "splitwise_planner_action_failures",
            "Planner actions that failed.",
            ["kind"],
            registry=self.registry,
        )
        self.nodes = Gauge(
            "splitwise_planner_nodes", "Live nodes the planner sees.", ["role"], registry=self.registry
        )


class Planner:
    def __init__(
        self,
        client: redis.Redis,
        keys: KeySchema,
        config: PolicyConfig,
        actuator: Actuator,
        *,
        interval_s: float = 2.0,
        clock: Clock = SYSTEM_CLOCK,
        metrics: PlannerMetrics | None = None,
        planner_id: str | None = None,
    ) -> None:
        self.client, self.keys, self.config, self.actuator = client, keys, config, actuator
        self.interval_s = interval_s
        self.clock = clock
        self.metrics = metrics or PlannerMetrics()
        self.planner_id = planner_id or f"planner-{uuid.uuid4().hex[:8]}"
        self.state = PlannerState()
        self.last_signals: Signals | None = None

    def step(self) -> Decision:
        """One look at the cluster and at most one action."""
        signals = read_signals(self.client, self.keys)
        self.last_signals = signals
        decision, self.state = decide(signals, self.state, self.config, self.clock.monotonic())
        self.metrics.decisions.labels(decision.kind.value).inc()
        for role in (Role.PREFILL, Role.DECODE):
            self.metrics.nodes.labels(role.value).set(signals.count(role))
        ts_ms = self.clock.time_ms()
        if decision.kind.is_action:
            log.info(
                "planner_decision",
                kind=decision.kind.value,
                node=decision.node_id,
                reason=decision.reason,
                **decision.signals,
            )
            outcome = self._act(decision)
            record_decision(self.client, self.keys, decision, ts_ms=ts_ms, outcome=outcome)
        else:
            log.debug("planner_hold", reason=decision.reason, **decision.signals)
        ttl_ms = int(max(10.0, 5 * self.interval_s) * 1000)
        record_state(
            self.client,
            self.keys,
            decision,
            planner_id=self.planner_id,
            config=self.config,
            ts_ms=ts_ms,
            ttl_ms=ttl_ms,
        )
        return decision

    def _act(self, decision: Decision) -> str:
        try:
            if decision.kind in (Kind.TO_PREFILL, Kind.TO_DECODE):
                assert decision.target is not None
                self.actuator.switch(decision.node_id, decision.target, reason=decision.reason)
            elif decision.kind in (Kind.ADD_PREFILL, Kind.ADD_DECODE):
                assert decision.target is not None
                new_id = self.actuator.add(decision.target, reason=decision.reason)
                return f"sent: started {new_id}"
            else:
                self.actuator.remove(decision.node_id, reason=decision.reason)
        except Exception as exc:  # noqa: BLE001 - one action's boundary: record it, try again later
            self.metrics.failures.labels(decision.kind.value).inc()
            log.warning(
                "planner_action_failed", kind=decision.kind.value, node=decision.node_id, error=str(exc)
            )
            return f"failed: {type(exc).__name__}: {exc}"
        return "sent"

    def run(self, stop: threading.Event) -> None:
        """Step every ``interval_s`` until ``stop`` is set (the process's error boundary for Redis)."""
        log.info("planner_started", planner_id=self.planner_id, topic=self.keys.topic)
        while not stop.is_set():
            try:
                self.step()
            except (redis.RedisError, PlannerError, OSError) as exc:
                self.metrics.failures.labels("read").inc()
                log.warning("planner_step_failed", error=str(exc))
            stop.wait(self.interval_s)
        log.info("planner_stopped", planner_id=self.planner_id)
