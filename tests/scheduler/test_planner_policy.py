"""The planner's pure policy: exact decisions from snapshots and an explicit clock."""

from __future__ import annotations

import pytest

from splitwise.codes import Role
from splitwise.planner.policy import (
    Decision,
    Kind,
    NodeSignals,
    PlannerState,
    PolicyConfig,
    Signals,
    decide,
    pressures,
)

CFG = PolicyConfig(
    ttft_slo_ms=500,
    itl_slo_ms=50,
    prefill_tokens_high=1000,
    sustain_s=10,
    cooldown_s=20,
    reverse_cooldown_s=60,
    idle_s=30,
    change_timeout_s=100,
)


def node(node_id: str, role: Role, **load: float) -> NodeSignals:
    return NodeSignals(node_id=node_id, role=role, **load)  # type: ignore[arg-type]


def prompt_heavy(*, decode_roles: tuple[Role, ...] = (Role.DECODE, Role.DECODE)) -> Signals:
    """TTFT over its SLO, prompt tokens piling up on P; decode idle and fast."""
    nodes = [node("p0", Role.PREFILL, queued_prefill_tokens=3000, booked_prefill_tokens=500)]
    for i, role in enumerate(decode_roles):
        nodes.append(
            node(f"d{i}", role, running_requests=2 + i, ttft_p90_ms=900, itl_p90_ms=10, latency_samples=20)
        )
    return Signals(tuple(nodes))


def output_heavy() -> Signals:
    return Signals(
        (
            node("p0", Role.PREFILL, queued_prefill_tokens=10),
            node("p1", Role.PREFILL, booked_prefill_tokens=5),
            node("d0", Role.DECODE, running_requests=30, kv_usage=0.95, itl_p90_ms=120, latency_samples=50),
        )
    )


def idle(prefill: int = 2, decode: int = 2) -> Signals:
    nodes = [node(f"p{i}", Role.PREFILL) for i in range(prefill)]
    nodes += [
        node(f"d{i}", Role.DECODE, latency_samples=5, ttft_p90_ms=50, itl_p90_ms=5) for i in range(decode)
    ]
    return Signals(tuple(nodes))


def run(
    signals: Signals, times: list[float], cfg: PolicyConfig = CFG, state: PlannerState | None = None
) -> tuple[list[Decision], PlannerState]:
    state = state or PlannerState()
    decisions: list[Decision] = []
    for t in times:
        decision, state = decide(signals, state, cfg, t)
        decisions.append(decision)
    return decisions, state


def test_latency_comes_from_decode_nodes_only() -> None:
    stale = Signals(
        (
            node("p0", Role.PREFILL, ttft_p90_ms=5000, itl_p90_ms=900, latency_samples=30),  # was a decode
            node("d0", Role.DECODE, ttft_p90_ms=100, itl_p90_ms=4, latency_samples=3),
            node("d1", Role.DECODE, ttft_p90_ms=700, itl_p90_ms=900, latency_samples=0),  # no samples
        )
    )
    assert (stale.ttft_p90_ms, stale.itl_p90_ms) == (100, 4)


def test_pressures_name_each_signal() -> None:
    p = pressures(prompt_heavy(), CFG)
    assert p.prefill_pressed and p.decode_relaxed and not p.decode_pressed
    assert p.why_prefill == "ttft_p90 900ms > slo 500ms; prompt tokens per prefill 3500 > 1000"
    d = pressures(output_heavy(), CFG)
    assert d.decode_pressed and d.prefill_relaxed
    assert d.why_decode == "itl_p90 120ms > slo 50ms; kv usage 0.95 > 0.85"


def test_sustained_prompt_pressure_switches_the_idlest_decode_to_prefill() -> None:
    decisions, state = run(prompt_heavy(), [0, 5, 9.9, 10])
    assert [d.kind for d in decisions] == [Kind.HOLD, Kind.HOLD, Kind.HOLD, Kind.TO_PREFILL]
    assert decisions[1].reason.startswith("prefill pressed for 5s < sustain 10s")
    move = decisions[-1]
    assert move.node_id == "d0"  # 2 running requests against d1's 3
    assert move.reason.startswith("prefill pressed for 10s (ttft_p90 900ms > slo 500ms")
    assert move.signals["prefill_nodes"] == 1 and move.signals["decode_nodes"] == 2
    assert state.pending is not None and state.pending.target == Role.PREFILL


def test_output_pressure_switches_a_prefill_to_decode() -> None:
    decisions, _ = run(output_heavy(), [0, 10])
    assert decisions[-1].kind == Kind.TO_DECODE
    assert decisions[-1].node_id == "p1"  # 5 prompt tokens against p0's 10


def test_a_break_in_pressure_restarts_the_sustain_window() -> None:
    _, state = run(prompt_heavy(), [0, 8])
    decision, state = decide(idle(), state, CFG, 9)
    assert decision.kind == Kind.HOLD
    decisions, _ = run(prompt_heavy(), [10, 19, 20], state=state)
    assert [d.kind for d in decisions] == [Kind.HOLD, Kind.HOLD, Kind.TO_PREFILL]


def test_one_change_at_a_time_then_cooldown() -> None:
    decisions, state = run(prompt_heavy(), [0, 10, 11])
    assert decisions[1].kind == Kind.TO_PREFILL
    assert decisions[2].reason == "waiting for to_prefill of d0"
    # d0 now shows as prefill: the change is done, the cooldown (20 s from t=10) still runs
    after = prompt_heavy(decode_roles=(Role.PREFILL, Role.DECODE))
    decision, state = decide(after, state, CFG, 12)
    assert state.pending is None
    assert decision.kind == Kind.HOLD and decision.reason.startswith("cooldown (18s left)")


def test_a_change_never_seen_done_times_out() -> None:
    _, state = run(prompt_heavy(), [0, 10])
    decision, state = decide(prompt_heavy(), state, CFG, 109)
    assert decision.reason == "waiting for to_prefill of d0"
    decision, state = decide(prompt_heavy(), state, CFG, 110)
    assert state.pending is None and decision.kind == Kind.HOLD  # pressure builds up again first


def test_never_leaves_a_role_empty() -> None:
    one_decode = Signals(
        (
            node("p0", Role.PREFILL, queued_prefill_tokens=5000),
            node("d0", Role.DECODE, ttft_p90_ms=2000, latency_samples=9),
        )
    )
    decisions, _ = run(one_decode, [0, 10, 100])
    assert {d.kind for d in decisions} == {Kind.HOLD}
    assert decisions[-1].reason.startswith("prefill pressed (")


def test_min_zero_allows_emptying_a_role() -> None:
    cfg = PolicyConfig(**{**CFG.__dict__, "min_decode": 0})
    one_decode = Signals((node("p0", Role.PREFILL, queued_prefill_tokens=5000), node("d0", Role.DECODE)))
    decisions, _ = run(one_decode, [0, 10], cfg=cfg)
    assert decisions[-1].kind == Kind.TO_PREFILL and decisions[-1].node_id == "d0"


def test_respects_the_pressed_roles_maximum() -> None:
    cfg = PolicyConfig(**{**CFG.__dict__, "max_prefill": 1})
    decisions, _ = run(prompt_heavy(), [0, 10, 30], cfg=cfg)
    assert {d.kind for d in decisions} == {Kind.HOLD}


def test_below_minimum_switches_at_once() -> None:
    cfg = PolicyConfig(**{**CFG.__dict__, "min_prefill": 2})
    decisions, _ = run(idle(prefill=1, decode=3), [0], cfg=cfg)
    assert decisions[0].kind == Kind.TO_PREFILL
    assert decisions[0].reason == "prefill nodes 1 < --min-prefill 2"


def test_no_reverse_switch_inside_the_reverse_cooldown() -> None:
    _, state = run(prompt_heavy(), [0, 10])
    flipped = prompt_heavy(decode_roles=(Role.PREFILL, Role.DECODE))
    _, state = decide(flipped, state, CFG, 11)
    # now the load turns output-heavy: past the cooldown and sustain, but inside the reverse cooldown
    heavy = Signals(
        (
            node("p0", Role.PREFILL),
            node("d0", Role.PREFILL),
            node("d1", Role.DECODE, itl_p90_ms=200, latency_samples=30),
        )
    )
    decisions, state = run(heavy, [40, 55, 69], state=state)
    assert {d.kind for d in decisions} == {Kind.HOLD}
    decision, _ = decide(heavy, state, CFG, 70)
    assert decision.kind == Kind.TO_DECODE


def test_both_pressed_holds() -> None:
    both = Signals(
        (
            node("p0", Role.PREFILL, queued_prefill_tokens=5000),
            node("d0", Role.DECODE, kv_usage=0.99),
            node("d1", Role.DECODE, kv_usage=0.99),
        )
    )
    decisions, _ = run(both, [0, 50])
    assert decisions[-1].kind == Kind.HOLD
    assert decisions[-1].reason.startswith("both sides pressed")


def test_hysteresis_between_pressed_and_relaxed() -> None:
    # decode neither pressed nor relaxed (ITL between relax x SLO and SLO): no switch away from it
    middling = Signals(
        (
            node("p0", Role.PREFILL, queued_prefill_tokens=5000),
            node("d0", Role.DECODE, itl_p90_ms=40, latency_samples=10),
            node("d1", Role.DECODE, itl_p90_ms=40, latency_samples=10),
        )
    )
    decisions, _ = run(middling, [0, 10, 50])
    assert {d.kind for d in decisions} == {Kind.HOLD}
    assert decisions[-1].reason.startswith("prefill pressed (")
    assert decisions[-1].reason.endswith("the other side not relaxed")


def test_with_instances_adds_before_switching_and_scales_in_when_idle() -> None:
    cfg = PolicyConfig(**{**CFG.__dict__, "allow_instances": True, "max_prefill": 2})
    decisions, state = run(prompt_heavy(), [0, 10], cfg=cfg)
    assert decisions[-1].kind == Kind.ADD_PREFILL and decisions[-1].node_id == ""
    grown = Signals((*prompt_heavy().nodes, node("prefill-1", Role.PREFILL)))
    decision, state = decide(grown, state, cfg, 11)
    assert state.pending is None and decision.reason.startswith("cooldown")
    decisions, state = run(idle(prefill=2, decode=2), [40, 69, 70], cfg=cfg, state=state)
    assert [d.kind for d in decisions] == [Kind.HOLD, Kind.HOLD, Kind.REMOVE_DECODE]
    assert decisions[-1].node_id == "d0"


def test_scale_in_stops_at_the_minimum() -> None:
    cfg = PolicyConfig(**{**CFG.__dict__, "allow_instances": True})
    decisions, _ = run(idle(prefill=1, decode=1), [0, 100], cfg=cfg)
    assert decisions[-1].kind == Kind.HOLD and decisions[-1].reason == "within SLOs"


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("ttft_slo_ms", 0, "--ttft-slo-ms"),
        ("itl_slo_ms", -1, "--itl-slo-ms"),
        ("min_prefill", 3, "--min-prefill/--max-prefill"),
        ("max_decode", 0, "--min-decode/--max-decode"),
        ("cooldown_s", -1, "--planner-cooldown-s"),
    ],
)
def test_config_errors_name_the_flag(field: str, value: float, flag: str) -> None:
    kwargs = {"max_prefill": 2, field: value}
    with pytest.raises(ValueError, match=flag):
        PolicyConfig(**kwargs)  # type: ignore[arg-type]
