"""`splitwise planner`: watch the cluster's queues, KV usage and TTFT/ITL in Redis and move
capacity between prefill and decode by switching roles (`splitwise role`), to keep both SLOs.

Its own process, beside any number of instances and routers (run one planner per topic). Every
decision is logged with its reason and kept in ``{t}:planner`` (`splitwise inspect` shows it).
`splitwise up --planner` runs the same loop inside `up`, where it may also start and stop
instances within --min/--max. This is the process's error boundary: bad flags exit 2 naming the
flag, an unreachable Redis exits 1, SIGINT/SIGTERM stop it after the step in progress.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

import click

from scheduler.config import SchedulerConfig, scheduler_options

F = TypeVar("F", bound=Callable[..., Any])

_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--ttft-slo-ms", {"type": float, "default": 1000.0, "help": "TTFT SLO (p90), milliseconds."}),
    (
        "--itl-slo-ms",
        {"type": float, "default": 100.0, "help": "Inter-token latency SLO (p90), milliseconds."},
    ),
    ("--min-prefill", {"type": int, "default": 1, "help": "Fewest prefill nodes the planner leaves."}),
    ("--max-prefill", {"type": int, "default": 8, "help": "Most prefill nodes the planner makes."}),
    ("--min-decode", {"type": int, "default": 1, "help": "Fewest decode nodes the planner leaves."}),
    ("--max-decode", {"type": int, "default": 8, "help": "Most decode nodes the planner makes."}),
    (
        "--planner-interval-s",
        {"type": float, "default": 2.0, "help": "Seconds between two looks at the cluster."},
    ),
    (
        "--planner-sustain-s",
        {"type": float, "default": 10.0, "help": "Seconds one side must stay pressed before capacity moves."},
    ),
    (
        "--planner-cooldown-s",
        {"type": float, "default": 20.0, "help": "Seconds after a change before the next one."},
    ),
    (
        "--planner-reverse-cooldown-s",
        {"type": float, "default": 60.0, "help": "Seconds before a switch undoes the previous one."},
    ),
    (
        "--planner-idle-s",
        {
            "type": float,
            "default": 60.0,
            "help": "With instances: seconds both sides stay relaxed before scale-in.",
        },
    ),
    (
        "--planner-prefill-tokens-high",
        {
            "type": int,
            "default": 4096,
            "help": "Prompt tokens (queued + booked) per prefill node that press it.",
        },
    ),
    (
        "--planner-kv-usage-high",
        {"type": float, "default": 0.85, "help": "KV usage of a decode node (0-1) that presses decode."},
    ),
    (
        "--planner-drain-grace-s",
        {"type": float, "default": 30.0, "help": "Grace a switched node has to drain its requests."},
    ),
    (
        "--planner-metrics-port",
        {"type": int, "default": None, "help": "Serve the planner's Prometheus /metrics on 127.0.0.1:PORT."},
    ),
]


def planner_options(func: F) -> F:
    """click decorator adding the planner's flags (`splitwise planner`, `splitwise up --planner`)."""
    for flag, kwargs in reversed(_OPTIONS):
        func = click.option(flag, show_default=kwargs.get("default") is not None, **kwargs)(func)
    return func


def policy_config(options: dict[str, Any], *, allow_instances: bool) -> Any:
    """The frozen PolicyConfig from the planner's flags (ValueError naming the flag)."""
    from splitwise.planner.policy import PolicyConfig

    return PolicyConfig(
        ttft_slo_ms=options["ttft_slo_ms"],
        itl_slo_ms=options["itl_slo_ms"],
        min_prefill=options["min_prefill"],
        max_prefill=options["max_prefill"],
        min_decode=options["min_decode"],
        max_decode=options["max_decode"],
        prefill_tokens_high=options["planner_prefill_tokens_high"],
        kv_usage_high=options["planner_kv_usage_high"],
        sustain_s=options["planner_sustain_s"],
        idle_s=options["planner_idle_s"],
        cooldown_s=options["planner_cooldown_s"],
        reverse_cooldown_s=options["planner_reverse_cooldown_s"],
        change_timeout_s=max(120.0, 4 * options["planner_drain_grace_s"]),
        allow_instances=allow_instances,
    )


def check_loop_flags(options: dict[str, Any]) -> None:
    if options["planner_interval_s"] <= 0:
        raise click.BadParameter("must be > 0 seconds", param_hint="--planner-interval-s")
    if options["planner_drain_grace_s"] < 0:
        raise click.BadParameter("must be >= 0 seconds", param_hint="--planner-drain-grace-s")
    port = options.get("planner_metrics_port")
    if port is not None and not 0 <= port <= 65535:
        raise click.BadParameter(f"{port} is not a port", param_hint="--planner-metrics-port")


def serve_metrics(registry: Any, port: int | None) -> Any:
    """Start the /metrics server on 127.0.0.1 (None: no metrics server). Returns the server or None."""
    if port is None:
        return None
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    return server


@click.command("planner")
@scheduler_options
@planner_options
def planner(**options: Any) -> None:
    """Switch node roles to keep the TTFT and ITL SLOs (decisions in `splitwise inspect`)."""
    from scheduler.connection import make_sync_client
    from scheduler.keys import KeySchema
    from splitwise.planner.actuators import RoleSwitcher
    from splitwise.planner.loop import Planner

    check_loop_flags(options)
    try:
        scheduler = SchedulerConfig.from_options(options)
        config = policy_config(options, allow_instances=False)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    client = make_sync_client(scheduler)
    keys = KeySchema(scheduler.scheduler_topic)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001 - start-up boundary: say why and exit 1
        raise click.ClickException(f"cannot reach Redis at {scheduler.where}: {exc}") from None
    switcher = RoleSwitcher(client, keys, grace_s=options["planner_drain_grace_s"])
    loop = Planner(client, keys, config, switcher, interval_s=options["planner_interval_s"])
    server = serve_metrics(loop.metrics.registry, options["planner_metrics_port"])
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    click.echo(
        f"planner {loop.planner_id} on topic {scheduler.scheduler_topic} ({scheduler.where})", err=True
    )
    try:
        loop.run(stop)
    finally:
        if server is not None:
            server.shutdown()
        client.close()
