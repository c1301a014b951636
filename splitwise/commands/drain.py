"""`splitwise drain NODE_ID`: tell one instance to drain and exit.

Writes a ``DrainRequest`` to the node's control stream (scheduler.node_commands.send_command):
the node leaves dispatch at once, hands back its queued work, moves or finishes its running
requests within ``--grace-period``, deregisters and exits 0 (splitwise/instance/drain.py).
``--wait`` returns once the node deregistered (exit 1 if it did not within ``--timeout``).
"""

from __future__ import annotations

import getpass
import socket
import time
from typing import Any

import click

from scheduler.config import SchedulerConfig, scheduler_options

GRACE_HELP = "Seconds running requests may finish before they are handed back (re-dispatched)."


def who() -> str:
    """``requested_by`` of a command given on this machine's command line."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"cli:{user}@{socket.gethostname()}"


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    """Poll ``predicate()`` every 0.2 s; a ClickException naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise click.ClickException(f"{what} not seen within --timeout {timeout_s:g}s")
        time.sleep(0.2)


def config_of(options: dict[str, Any]) -> SchedulerConfig:
    try:
        return SchedulerConfig.from_options(options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@click.command("drain")
@click.argument("node_id")
@scheduler_options
@click.option(
    "--grace-period",
    "grace_s",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help=GRACE_HELP,
)
@click.option("--reason", default="operator drain", show_default=True, help="Shown by `splitwise inspect`.")
@click.option("--wait", is_flag=True, help="Return once the node deregistered.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="With --wait.",
)
def drain(node_id: str, grace_s: float, reason: str, wait: bool, timeout_s: float, **options: Any) -> None:
    """Drain NODE_ID: stop dispatching to it, move or finish its work, deregister, exit."""
    from scheduler.connection import make_sync_client
    from scheduler.keys import KeySchema
    from scheduler.node_commands import UnknownNodeError, send_command

    config = config_of(options)
    keys = KeySchema(config.scheduler_topic)
    client = make_sync_client(config)
    try:
        try:
            command = send_command(
                client,
                keys,
                node_id,
                role=None,
                reason=reason,
                requested_by=who(),
                grace_s=grace_s,
                ttl_ms=config.ttl_ms,
                stream_maxlen=config.stream_maxlen,
            )
        except UnknownNodeError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"drain sent to {node_id} (incarnation {command.incarnation}, grace {grace_s:g}s)")
        if wait:
            wait_for(
                lambda: not client.zscore(keys.alive, f"{node_id}|{command.incarnation}"),
                timeout_s + grace_s,
                f"{node_id} deregistering",
            )
            click.echo(f"{node_id} drained and deregistered")
    finally:
        client.close()
