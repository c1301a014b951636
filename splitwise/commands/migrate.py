"""`splitwise migrate REQ_ID [--to NODE_ID]`: live-migrate a running request to another decode node.

Writes one ``MigrateCommand`` to the control stream of every live decode node (or only ``--from``):
the node that runs the request migrates it (to ``--to``, or to the live decode node of the same
model and KV geometry with the most free KV blocks), the others ignore it. The client's stream goes
on without a gap; ``splitwise inspect --request REQ_ID`` shows the migration once the request ended,
and the source node's /metrics count it (``splitwise_migrations_*``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import click

from scheduler.config import SchedulerConfig, scheduler_options


async def send(config: SchedulerConfig, req_id: str, *, to: str | None, source: str | None) -> list[str]:
    """Queue the command; returns the node ids it went to. Raises click.UsageError naming the flag."""
    from scheduler.connection import check_server, make_client
    from scheduler.keys import KeySchema, check_id
    from scheduler.messages import MigrateCommand
    from scheduler.migration import decode_peers, send_migrate

    try:
        check_id("req_id", req_id)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    client = make_client(config)
    keys = KeySchema(config.scheduler_topic)
    try:
        await check_server(client, config)
        live = [p.info.node_id for p in await decode_peers(client, keys)]
        if to is not None and to not in live:
            raise click.UsageError(
                f"--to: {to!r} is not a live decode node (live: {', '.join(live) or 'none'})"
            )
        if source is not None and source not in live:
            raise click.UsageError(
                f"--from: {source!r} is not a live decode node (live: {', '.join(live) or 'none'})"
            )
        nodes = [source] if source is not None else [n for n in live if n != to]
        if not nodes:
            raise click.UsageError("no live decode node could be running the request")
        command = MigrateCommand(req_id=req_id, target_node_id=to or "", reason="manual")
        await send_migrate(
            client, keys, command, node_ids=nodes, ttl_ms=config.ttl_ms, maxlen=config.stream_maxlen
        )
        return nodes
    finally:
        await client.aclose()


@click.command("migrate")
@click.argument("req_id")
@click.option(
    "--to", "to", default=None, help="Decode node to move the request to (default: the scheduler picks)."
)
@click.option(
    "--from", "source", default=None, help="Decode node that runs it (default: ask every decode node)."
)
@scheduler_options
def migrate(req_id: str, to: str | None, source: str | None, **options: Any) -> None:
    """Live-migrate running request REQ_ID to another decode node."""
    try:
        config = SchedulerConfig.from_options(options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    nodes = asyncio.run(send(config, req_id, to=to, source=source))
    click.echo(f"migrate {req_id}: asked {', '.join(nodes)}" + (f" (to {to})" if to else ""))
