"""`splitwise up`: a local P/D cluster in one command.

Starts its own redis-server (unless --scheduler-host is given), N prefill and M decode instances
and a `splitwise router` (the front door: its URL is the base URL), shows progress while they
load, prints the OpenAI base URL once every process is healthy, and shuts everything down
(children included) on Ctrl-C or SIGTERM. With the router, an instance that dies is reported and
the cluster goes on serving through the others; the router dying ends `up`.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType

import click

from splitwise.cluster import Child, ClusterError, ClusterSpec, LocalCluster
from splitwise.commands.serve_flags import ServeCommand


@click.command("up", cls=ServeCommand)
@click.option("--model", default=None, help="Local model directory (default: the built-in `small` model).")
@click.option(
    "--prefill",
    "num_prefill",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Prefill instances.",
)
@click.option(
    "--decode",
    "num_decode",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Decode instances.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="HTTP port of the entry: the router (or, with --no-router, the first decode instance).",
)
@click.option(
    "--router/--no-router",
    "with_router",
    default=True,
    show_default=True,
    help="Start a `splitwise router` as the front door.",
)
@click.option(
    "--transfer",
    type=click.Choice(["ipc", "tcp", "rdma"]),
    default="ipc",
    show_default=True,
    help="KV transfer protocol between P and D.",
)
@click.option(
    "--prefill-tp",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Tensor-parallel size of each prefill instance.",
)
@click.option(
    "--decode-tp",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Tensor-parallel size of each decode instance.",
)
@click.option("--scheduler-host", default=None, help="Use this Redis instead of starting one.")
@click.option("--scheduler-port", type=click.IntRange(1, 65535), default=6379, show_default=True)
@click.option("--scheduler-topic", default="splitwise", show_default=True)
@click.option(
    "--scheduler-heartbeat-interval",
    type=float,
    default=1.0,
    show_default=True,
    help="Heartbeat period of every node and frontend, seconds.",
)
@click.option(
    "--scheduler-dead-after-missed",
    type=int,
    default=3,
    show_default=True,
    help="Missed heartbeats before a lease lapses (node or frontend).",
)
@click.option(
    "--migrate-make-room-free-blocks",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Passed to every decode instance (`splitwise serve`; 0: off).",
)
@click.option(
    "--migrate-balance-kv-gap",
    type=click.FloatRange(min=0.0, max=1.0, max_open=True),
    default=0.0,
    show_default=True,
    help="Passed to every decode instance (`splitwise serve`; 0: off).",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=900.0,
    show_default=True,
    help="Seconds to wait for every instance.",
)
def up(
    model: str | None,
    num_prefill: int,
    num_decode: int,
    port: int,
    with_router: bool,
    transfer: str,
    prefill_tp: int,
    decode_tp: int,
    scheduler_host: str | None,
    scheduler_port: int,
    scheduler_topic: str,
    scheduler_heartbeat_interval: float,
    scheduler_dead_after_missed: int,
    migrate_make_room_free_blocks: int,
    migrate_balance_kv_gap: float,
    timeout_s: float,
) -> None:
    """Start a local cluster: redis-server, N prefill and M decode instances, and a router."""
    try:
        spec = ClusterSpec(
            model=model,
            num_prefill=num_prefill,
            num_decode=num_decode,
            port=port,
            router=with_router,
            transfer=transfer,
            prefill_tp=prefill_tp,
            decode_tp=decode_tp,
            scheduler_host=scheduler_host,
            scheduler_port=scheduler_port,
            topic=scheduler_topic,
            heartbeat_interval_s=scheduler_heartbeat_interval,
            dead_after_missed=scheduler_dead_after_missed,
            extra_args=[
                "--migrate-make-room-free-blocks",
                str(migrate_make_room_free_blocks),
                "--migrate-balance-kv-gap",
                str(migrate_balance_kv_gap),
            ],
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if model is None:
        # Build the built-in model once here, so N instances do not race to generate it.
        from splitwise.engine.tiny_model import default_model_dir

        click.echo("preparing the built-in `small` model ...", err=True)
        spec.model = str(default_model_dir("small"))
    cluster = LocalCluster(spec)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        cluster.start()
        if cluster.redis is not None:
            click.echo(f"redis-server on {cluster.redis.host}:{cluster.redis.port}", err=True)
        names = ", ".join(c.name for c in cluster.children)
        click.echo(f"starting {names} (logs in {cluster.log_dir}) ...", err=True)

        def progress(child: Child, elapsed: float) -> None:
            click.echo(f"  {child.name:<10} ready in {elapsed:5.1f}s  {child.base_url}", err=True)

        if not cluster.wait_ready(timeout_s, progress, should_stop=stop.is_set):
            click.echo("interrupted; shutting down", err=True)
            return
        entry = cluster.entry
        click.echo(f"OpenAI base URL: {entry.base_url}")
        click.echo(
            f"try: curl {entry.base_url}/completions -H 'Content-Type: application/json' "
            f'-d \'{{"prompt": "Hello", "max_tokens": 16}}\'',
            err=True,
        )
        sys.stdout.flush()
        reported: set[str] = set()
        while not stop.is_set():
            dead = [c for c in cluster.dead_children() if c.name not in reported]
            for child in dead:
                reported.add(child.name)
                click.echo(
                    f"{child.name} exited unexpectedly with {child.process.returncode}\n{cluster.log_tail(child)}",
                    err=True,
                )
            if dead and (not with_router or any(c.role == "router" for c in dead)):
                code = 1
                break
            stop.wait(0.5)
        click.echo("shutting down", err=True)
    except ClusterError as exc:
        click.echo(f"error: {exc}", err=True)
        code = 1
    finally:
        started = time.monotonic()
        cluster.stop()
        click.echo(f"stopped ({time.monotonic() - started:.1f}s)", err=True)
    if code:
        sys.exit(code)
