"""`splitwise role NODE_ID prefill|decode|mixed`: switch one instance's role in place.

The node drains (state ``switching``: out of dispatch, queued work handed back, running requests
moved or finished within ``--grace-period``), rebuilds its P/D parts for the new role and registers
again, in the same process with the same engine (splitwise/instance/role_switch.py).

``request_role_change`` is the library call (the planner uses it).
"""

from __future__ import annotations

from typing import Any

import click
import redis

from scheduler.config import SchedulerConfig, scheduler_options
from scheduler.keys import KeySchema
from splitwise.codes import ROLES, Role
from splitwise.commands.drain import GRACE_HELP, config_of, wait_for, who


def request_role_change(
    client: redis.Redis,
    keys: KeySchema,
    node_id: str,
    role: Role,
    *,
    reason: str,
    grace_s: float,
    requested_by: str = "planner",
    ttl_ms: int = SchedulerConfig().ttl_ms,
) -> None:
    """Ask ``node_id`` to switch to ``role`` (a RoleChangeRequest on its control stream; returns
    at once, the switch shows in `splitwise inspect` as state ``switching``, then the new role).
    Raises scheduler.node_commands.UnknownNodeError (not registered / lease lapsed), ValueError
    (negative grace), redis errors."""
    from scheduler.node_commands import send_command

    send_command(
        client,
        keys,
        node_id,
        role=Role(role),
        reason=reason,
        requested_by=requested_by,
        grace_s=grace_s,
        ttl_ms=ttl_ms,
    )


def registered_role(client: redis.Redis, keys: KeySchema, node_id: str) -> tuple[str, str] | None:
    """(role, state) of the node's live registration, None while it has none."""
    from scheduler.node_commands import UnknownNodeError, node_info

    try:
        info = node_info(client, keys, node_id)
    except UnknownNodeError:
        return None
    state: Any = client.hget(keys.heartbeat(node_id), "state")
    return str(info.role), state.decode() if state else "serving"


@click.command("role")
@click.argument("node_id")
@click.argument("role", type=click.Choice(ROLES))
@scheduler_options
@click.option(
    "--grace-period",
    "grace_s",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help=GRACE_HELP,
)
@click.option(
    "--reason", default="operator role change", show_default=True, help="Shown by `splitwise inspect`."
)
@click.option("--wait", is_flag=True, help="Return once the node serves in its new role.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    help="With --wait.",
)
def role(
    node_id: str, role: str, grace_s: float, reason: str, wait: bool, timeout_s: float, **options: Any
) -> None:
    """Switch NODE_ID to ROLE without restarting it (drain, flip, register again)."""
    from scheduler.connection import make_sync_client
    from scheduler.node_commands import UnknownNodeError

    config = config_of(options)
    keys = KeySchema(config.scheduler_topic)
    client = make_sync_client(config)
    try:
        try:
            request_role_change(
                client,
                keys,
                node_id,
                Role(role),
                reason=reason,
                grace_s=grace_s,
                requested_by=who(),
                ttl_ms=config.ttl_ms,
            )
        except UnknownNodeError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"role change to {role} sent to {node_id} (grace {grace_s:g}s)")
        if wait:
            wait_for(
                lambda: registered_role(client, keys, node_id) == (role, "serving"),
                timeout_s + grace_s,
                f"{node_id} serving as {role}",
            )
            click.echo(f"{node_id} serves as {role}")
    finally:
        client.close()
