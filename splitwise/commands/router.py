"""`splitwise router`: the cluster's front door, an OpenAI server with no engine.

It tokenizes and renders chat templates with the model's tokenizer, dispatches every request
through the Redis scheduler (the same atomic pick the instances' frontends make) and streams the
results. It holds no state but the requests in flight, so several may run behind one HTTP load
balancer. This is the process's error boundary: bad flags exit 2 naming the flag, an unreachable
Redis or an unreadable model exits 1 with the reason, SIGINT/SIGTERM shut it down cleanly.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

import click

from scheduler.config import SchedulerConfig
from splitwise.commands.options import resolve_model, server_options
from splitwise.commands.startup_errors import StartupError


@click.command("router")
@server_options  # the same model, listener, API and scheduler flags as `splitwise serve`
def router(**opts: Any) -> None:
    """Serve the OpenAI API for a P/D cluster, dispatching through Redis (no engine)."""
    from splitwise.instance.instance import bind_socket
    from splitwise.router.config import RouterConfig
    from splitwise.router.server import Router

    model_dir = resolve_model(opts["model"], default_size=opts["default_model_size"])
    try:
        config = RouterConfig(
            model=str(model_dir),
            scheduler=SchedulerConfig.from_options(opts),
            host=opts["host"],
            port=opts["port"],
            served_model_name=opts["served_model_name"],
            max_model_len=opts["max_model_len"],
            api_key=opts["api_key"],
            max_request_bytes=opts["max_request_bytes"],
            tool_call_parser=opts["tool_call_parser"],
        )
    except ValueError as exc:
        flag = str(exc).split(":", 1)[0] if str(exc).startswith("--") else None
        raise click.BadParameter(str(exc), param_hint=flag) from None
    try:
        sock = bind_socket(config.host, config.port)
    except OSError as exc:
        raise StartupError(f"--port {config.port}: cannot listen on {config.host} ({exc.strerror})") from None
    try:
        asyncio.run(_run(Router(config), sock, opts["ready_file"]))
    except ValueError as exc:
        raise StartupError(str(exc)) from None


async def _run(server: Any, sock: Any, ready_file: str | None) -> None:
    from scheduler.errors import SchedulerError
    from splitwise.engine.errors import ModelLoadError

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.request_stop)
    try:
        await server.start(sock)
    except (SchedulerError, ModelLoadError) as exc:
        await server.close()
        raise StartupError(str(exc)) from None
    except BaseException:
        await server.close()
        raise
    host = server.config.host
    info = {"role": "router", "http_port": server.port, "base_url": f"http://{host}:{server.port}/v1"}
    click.echo(json.dumps(info))
    sys.stdout.flush()
    if ready_file:
        tmp = ready_file + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(json.dumps(info) + "\n")
        os.replace(tmp, ready_file)
    await server.wait_stopped()
    await server.close()
