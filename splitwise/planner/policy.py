"""The planner's policy: one pure function from a signals snapshot and the clock to a decision.

    decide(signals, state, config, now_s) -> (Decision, PlannerState)

Nothing here does I/O or reads a clock: the loop (``splitwise.planner.loop``) reads the signals
from Redis, calls ``decide`` and carries out what it says. Every rule names its reason, so the
decision log says *why* capacity moved.

Pressure (computed over the live nodes of each role, see ``pressures``):

| side    | pressed when any of                                         | relaxed when all of                     |
|---------|-------------------------------------------------------------|-----------------------------------------|
| prefill | TTFT p90 > --ttft-slo-ms; prompt tokens (queued + booked)   | TTFT p90 < SLO x relax; tokens per P    |
|         | per prefill node > prefill_tokens_high                      | < prefill_tokens_high x relax           |
| decode  | ITL p90 > --itl-slo-ms; KV usage > kv_usage_high; requests  | ITL p90 < SLO x relax; KV usage <       |
|         | waiting for KV blocks on a decode node                      | kv_usage_high x relax; nobody waiting   |

Rules, first match wins, and only when no change is in flight and the cooldown has passed:

1. a role below its minimum: add a node (instances allowed) or switch one from the other role;
2. one side pressed, the other relaxed, for ``sustain_s`` without a break: add a node of the
   pressed role (instances allowed, below its maximum), else switch the least-loaded node of the
   relaxed role to it (never below the relaxed role's minimum, never above the pressed role's max);
3. instances allowed, both sides relaxed for ``idle_s``: remove the idlest node of a role above
   its minimum (decode first: it holds no queue).

Anti-flap: pressure must hold for ``sustain_s`` (a single bad sample does nothing), relaxation is
a lower bar than pressure (hysteresis), every action starts a cooldown, a switch in the reverse
direction of the last one waits ``reverse_cooldown_s``, and one change at a time (an action waits
until the snapshot shows it done, or ``change_timeout_s`` passed).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

from splitwise.codes import Role


class Kind(enum.StrEnum):
    HOLD = "hold"
    TO_PREFILL = "to_prefill"  # switch a decode node to prefill
    TO_DECODE = "to_decode"  # switch a prefill node to decode
    ADD_PREFILL = "add_prefill"
    ADD_DECODE = "add_decode"
    REMOVE_PREFILL = "remove_prefill"
    REMOVE_DECODE = "remove_decode"

    @property
    def is_action(self) -> bool:
        return self is not Kind.HOLD


@dataclass(frozen=True)
class PolicyConfig:
    ttft_slo_ms: float = 1000.0
    itl_slo_ms: float = 100.0
    min_prefill: int = 1
    max_prefill: int = 8
    min_decode: int = 1
    max_decode: int = 8
    prefill_tokens_high: int = 4096  # queued + booked prompt tokens per prefill node
    kv_usage_high: float = 0.85
    relax: float = 0.5  # a side is relaxed below relax x each pressure bar
    sustain_s: float = 10.0
    idle_s: float = 60.0
    cooldown_s: float = 20.0
    reverse_cooldown_s: float = 60.0
    change_timeout_s: float = 120.0
    allow_instances: bool = False  # `splitwise up --planner`: may start/stop instances

    def __post_init__(self) -> None:
        for flag, value in (("--ttft-slo-ms", self.ttft_slo_ms), ("--itl-slo-ms", self.itl_slo_ms)):
            if value <= 0:
                raise ValueError(f"{flag}: must be > 0, got {value}")
        for role in ("prefill", "decode"):
            low, high = getattr(self, f"min_{role}"), getattr(self, f"max_{role}")
            if low < 0 or high < max(1, low):
                raise ValueError(
                    f"--min-{role}/--max-{role}: need 0 <= min <= max and max >= 1, got {low}/{high}"
                )
        if not 0 < self.relax < 1:
            raise ValueError(f"relax: must be in (0, 1), got {self.relax}")
        if not 0 < self.kv_usage_high <= 1:
            raise ValueError(f"kv_usage_high: must be in (0, 1], got {self.kv_usage_high}")
        for name in ("sustain_s", "idle_s", "cooldown_s", "reverse_cooldown_s", "change_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"--planner-{name.removesuffix('_s').replace('_', '-')}-s: must be >= 0")


@dataclass(frozen=True)
class NodeSignals:
    """One live node as the planner sees it (its NodeInfo, LoadReport and booked load in Redis)."""

    node_id: str
    role: Role
    queued_prefill_tokens: int = 0
    booked_prefill_tokens: int = 0
    running_requests: int = 0
    waiting_requests: int = 0
    kv_usage: float = 0.0  # 1 - free / total KV blocks
    ttft_p90_ms: float = 0.0  # rolling, of the requests this node streamed (0: no samples)
    itl_p90_ms: float = 0.0
    latency_samples: int = 0

    @property
    def prompt_tokens(self) -> int:
        return self.queued_prefill_tokens + self.booked_prefill_tokens


@dataclass(frozen=True)
class Signals:
    nodes: tuple[NodeSignals, ...]

    def of(self, role: Role) -> list[NodeSignals]:
        return [n for n in self.nodes if n.role == role]

    def count(self, role: Role) -> int:
        return len(self.of(role))

    @property
    def ttft_p90_ms(self) -> float:
        """The worst decode node's rolling TTFT p90 (conservative: one slow node is an SLO miss).
        Decode nodes stream every disaggregated request; a prefill node's samples are stale ones
        from before a switch to prefill."""
        return max((n.ttft_p90_ms for n in self.of(Role.DECODE) if n.latency_samples), default=0.0)

    @property
    def itl_p90_ms(self) -> float:
        return max((n.itl_p90_ms for n in self.of(Role.DECODE) if n.latency_samples), default=0.0)

    def summary(self) -> dict[str, float | int]:
        prefill, decode = self.of(Role.PREFILL), self.of(Role.DECODE)
        return {
            "prefill_nodes": len(prefill),
            "decode_nodes": len(decode),
            "prompt_tokens_per_prefill": round(_mean([n.prompt_tokens for n in prefill]), 1),
            "decode_running": sum(n.running_requests for n in decode),
            "decode_waiting": sum(n.waiting_requests for n in decode),
            "kv_usage_max": round(max((n.kv_usage for n in decode), default=0.0), 3),
            "ttft_p90_ms": round(self.ttft_p90_ms, 1),
            "itl_p90_ms": round(self.itl_p90_ms, 1),
        }


@dataclass(frozen=True)
class Pending:
    """An action sent and not yet seen done in the snapshot."""

    kind: Kind
    node_id: str
    started_s: float
    target: Role | None  # the role the node should show (switch, add), None: it should be gone
    count_before: int = 0  # add: the target role's node count when it was decided


@dataclass(frozen=True)
class PlannerState:
    prefill_pressed_since: float | None = None
    decode_pressed_since: float | None = None
    idle_since: float | None = None
    last_action_s: float | None = None
    last_switch: Kind | None = None
    pending: Pending | None = None


@dataclass(frozen=True)
class Decision:
    kind: Kind
    reason: str
    node_id: str = ""  # the node to switch or remove; empty for hold and add
    signals: dict[str, float | int] = field(default_factory=dict)

    @property
    def target(self) -> Role | None:
        return {
            Kind.TO_PREFILL: Role.PREFILL,
            Kind.TO_DECODE: Role.DECODE,
            Kind.ADD_PREFILL: Role.PREFILL,
            Kind.ADD_DECODE: Role.DECODE,
        }.get(self.kind)


@dataclass(frozen=True)
class Pressure:
    prefill_pressed: bool
    prefill_relaxed: bool
    decode_pressed: bool
    decode_relaxed: bool
    why_prefill: str
    why_decode: str


def pressures(signals: Signals, config: PolicyConfig) -> Pressure:
    """Which side needs capacity and which can spare it (module docstring, the table)."""
    prefill, decode = signals.of(Role.PREFILL), signals.of(Role.DECODE)
    relax = config.relax
    ttft, itl = signals.ttft_p90_ms, signals.itl_p90_ms
    tokens = _mean([n.prompt_tokens for n in prefill]) if prefill else 0.0
    kv = max((n.kv_usage for n in decode), default=0.0)
    waiting = sum(n.waiting_requests for n in decode)
    why_p = [
        f"ttft_p90 {ttft:.0f}ms > slo {config.ttft_slo_ms:.0f}ms" if ttft > config.ttft_slo_ms else "",
        f"prompt tokens per prefill {tokens:.0f} > {config.prefill_tokens_high}"
        if tokens > config.prefill_tokens_high
        else "",
    ]
    why_d = [
        f"itl_p90 {itl:.0f}ms > slo {config.itl_slo_ms:.0f}ms" if itl > config.itl_slo_ms else "",
        f"kv usage {kv:.2f} > {config.kv_usage_high:.2f}" if kv > config.kv_usage_high else "",
        f"{waiting} requests wait for KV blocks" if waiting else "",
    ]
    return Pressure(
        prefill_pressed=any(why_p),
        prefill_relaxed=ttft < config.ttft_slo_ms * relax and tokens < config.prefill_tokens_high * relax,
        decode_pressed=any(why_d),
        decode_relaxed=itl < config.itl_slo_ms * relax and kv < config.kv_usage_high * relax and not waiting,
        why_prefill="; ".join(w for w in why_p if w),
        why_decode="; ".join(w for w in why_d if w),
    )


def decide(
    signals: Signals, state: PlannerState, config: PolicyConfig, now_s: float
) -> tuple[Decision, PlannerState]:
    """The next decision and the state to pass to the next call (see the module docstring)."""
    pressure = pressures(signals, config)
    state = _track(state, pressure, now_s)
    summary = signals.summary()

    def hold(reason: str) -> tuple[Decision, PlannerState]:
        return Decision(Kind.HOLD, reason, signals=summary), state

    if state.pending is not None:
        if not _is_done(state.pending, signals) and now_s - state.pending.started_s < config.change_timeout_s:
            return hold(f"waiting for {state.pending.kind} of {state.pending.node_id or 'a new node'}")
        state = dataclasses.replace(state, pending=None)
    if state.last_action_s is not None and now_s - state.last_action_s < config.cooldown_s:
        return hold(f"cooldown ({config.cooldown_s - (now_s - state.last_action_s):.0f}s left)")
    decision = (
        _below_minimum(signals, config)
        or _rebalance(signals, state, config, pressure, now_s)
        or _scale_in(signals, state, config, now_s)
    )
    if decision is None:
        return hold(_hold_reason(signals, pressure, state, config, now_s))
    decision = dataclasses.replace(decision, signals=summary)
    switched = decision.kind in (Kind.TO_PREFILL, Kind.TO_DECODE)
    state = dataclasses.replace(
        state,
        last_action_s=now_s,
        last_switch=decision.kind if switched else state.last_switch,
        pending=Pending(
            decision.kind,
            decision.node_id,
            now_s,
            decision.target,
            signals.count(decision.target) if decision.target is not None else 0,
        ),
        prefill_pressed_since=None,  # pressure must build up again after a change
        decode_pressed_since=None,
        idle_since=None,
    )
    return decision, state


def _track(state: PlannerState, pressure: Pressure, now_s: float) -> PlannerState:
    """Since when each condition has held without a break (None: it does not hold now)."""

    def since(held: bool, start: float | None) -> float | None:
        return (now_s if start is None else start) if held else None

    only_p = pressure.prefill_pressed and pressure.decode_relaxed
    only_d = pressure.decode_pressed and pressure.prefill_relaxed
    idle = pressure.prefill_relaxed and pressure.decode_relaxed
    return dataclasses.replace(
        state,
        prefill_pressed_since=since(only_p, state.prefill_pressed_since),
        decode_pressed_since=since(only_d, state.decode_pressed_since),
        idle_since=since(idle, state.idle_since),
    )


def _is_done(pending: Pending, signals: Signals) -> bool:
    if pending.kind in (Kind.ADD_PREFILL, Kind.ADD_DECODE):
        assert pending.target is not None
        return signals.count(pending.target) > pending.count_before  # its id is not known up front
    node = next((n for n in signals.nodes if n.node_id == pending.node_id), None)
    if pending.target is None:
        return node is None
    return node is not None and node.role == pending.target


def _below_minimum(signals: Signals, config: PolicyConfig) -> Decision | None:
    for role, other in ((Role.PREFILL, Role.DECODE), (Role.DECODE, Role.PREFILL)):
        have, need = signals.count(role), getattr(config, f"min_{role}")
        if have >= need:
            continue
        reason = f"{role} nodes {have} < --min-{role} {need}"
        if config.allow_instances and have < getattr(config, f"max_{role}"):
            return Decision(_ADD[role], reason)
        donor = _donor(signals, other, config)
        if donor is not None:
            return Decision(_SWITCH_TO[role], reason, node_id=donor)
    return None


def _rebalance(
    signals: Signals, state: PlannerState, config: PolicyConfig, pressure: Pressure, now_s: float
) -> Decision | None:
    for role, other, since, why in (
        (Role.PREFILL, Role.DECODE, state.prefill_pressed_since, pressure.why_prefill),
        (Role.DECODE, Role.PREFILL, state.decode_pressed_since, pressure.why_decode),
    ):
        if since is None or now_s - since < config.sustain_s:
            continue
        reason = f"{role} pressed for {now_s - since:.0f}s ({why}), {other} relaxed"
        if signals.count(role) >= getattr(config, f"max_{role}"):
            continue  # at its maximum: nothing to add or switch to it
        if config.allow_instances:
            return Decision(_ADD[role], reason)
        kind = _SWITCH_TO[role]
        reverse = _SWITCH_TO[other]
        if (
            state.last_switch is reverse
            and state.last_action_s is not None
            and now_s - state.last_action_s < config.reverse_cooldown_s
        ):
            continue
        donor = _donor(signals, other, config)
        if donor is not None:
            return Decision(kind, reason, node_id=donor)
    return None


def _scale_in(signals: Signals, state: PlannerState, config: PolicyConfig, now_s: float) -> Decision | None:
    if not config.allow_instances or state.idle_since is None or now_s - state.idle_since < config.idle_s:
        return None
    for role in (Role.DECODE, Role.PREFILL):
        if signals.count(role) > getattr(config, f"min_{role}"):
            node = _idlest(signals.of(role))
            reason = f"both sides relaxed for {now_s - state.idle_since:.0f}s, {role} above --min-{role}"
            return Decision(_REMOVE[role], reason, node_id=node)
    return None


def _donor(signals: Signals, role: Role, config: PolicyConfig) -> str | None:
    """The node of ``role`` to switch away, or None when that would take ``role`` below its min."""
    nodes = signals.of(role)
    if len(nodes) - 1 < max(getattr(config, f"min_{role}"), 0) or not nodes:
        return None
    return _idlest(nodes)


def _idlest(nodes: list[NodeSignals]) -> str:
    """The node that is quickest to drain: fewest running requests, then fewest prompt tokens."""
    return min(
        nodes, key=lambda n: (n.running_requests + n.waiting_requests, n.prompt_tokens, n.node_id)
    ).node_id


def _hold_reason(
    signals: Signals, pressure: Pressure, state: PlannerState, config: PolicyConfig, now_s: float
) -> str:
    for role in (Role.PREFILL, Role.DECODE):
        have, need = signals.count(role), getattr(config, f"min_{role}")
        if have < need:
            return f"{role} nodes {have} < --min-{role} {need}, and no node to spare"
    if pressure.prefill_pressed and pressure.decode_pressed:
        return f"both sides pressed ({pressure.why_prefill}; {pressure.why_decode}): nothing to spare"
    for name, since, why in (
        ("prefill", state.prefill_pressed_since, pressure.why_prefill),
        ("decode", state.decode_pressed_since, pressure.why_decode),
    ):
        if since is not None:
            if now_s - since < config.sustain_s:
                return f"{name} pressed for {now_s - since:.0f}s < sustain {config.sustain_s:.0f}s ({why})"
            return f"{name} pressed ({why}) but no move allowed by the bounds"
    if pressure.prefill_pressed or pressure.decode_pressed:
        side = "prefill" if pressure.prefill_pressed else "decode"
        return f"{side} pressed ({pressure.why_prefill or pressure.why_decode}), the other side not relaxed"
    return "within SLOs"


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0


_ADD = {Role.PREFILL: Kind.ADD_PREFILL, Role.DECODE: Kind.ADD_DECODE}
_REMOVE = {Role.PREFILL: Kind.REMOVE_PREFILL, Role.DECODE: Kind.REMOVE_DECODE}
_SWITCH_TO = {Role.PREFILL: Kind.TO_PREFILL, Role.DECODE: Kind.TO_DECODE}
