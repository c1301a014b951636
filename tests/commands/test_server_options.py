"""The flags `splitwise serve` and `splitwise router` share (``options.server_options``), and the
router's --max-request-bytes: a body above it is a 413 before anything parses it, as on instances
(a real router process-less server on a real redis-server, real HTTP)."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import click
import httpx
import pytest
from click.testing import CliRunner

from scheduler.config import SchedulerConfig, scheduler_options
from splitwise.api.body_limit import DEFAULT_MAX_REQUEST_BYTES
from splitwise.commands import options
from splitwise.commands.router import router
from splitwise.commands.serve import serve
from splitwise.engine.tiny_model import default_model_dir
from splitwise.router.config import RouterConfig
from splitwise.router.server import Router
from splitwise.testing.redis_server import RedisServer


def params(command: click.Command) -> dict[str, click.Option]:
    return {p.opts[0]: p for p in command.params if isinstance(p, click.Option)}


def scheduler_flags() -> list[str]:
    probe = scheduler_options(click.command()(lambda **_kw: None))
    return list(params(probe))


def signature(option: click.Option) -> tuple[Any, ...]:
    return (
        option.opts,
        option.secondary_opts,
        option.type.to_info_dict(),
        option.default,
        option.envvar,
        option.help,
        option.is_flag,
    )


def test_serve_and_router_declare_the_shared_flags_identically() -> None:
    shared = [*options.SERVER_OPTION_NAMES, *scheduler_flags()]
    assert {"--model", "--port", "--api-key", "--max-request-bytes", "--scheduler-host"} <= set(shared)
    serve_params, router_params = params(serve), params(router)
    for flag in shared:
        assert flag in serve_params and flag in router_params, flag
        assert signature(serve_params[flag]) == signature(router_params[flag]), flag
    # The router has no flag of its own: every one of its flags is a shared one.
    assert set(router_params) == set(shared)
    assert options.DEFAULT_MAX_REQUEST_BYTES == DEFAULT_MAX_REQUEST_BYTES


def test_router_names_the_flag_of_a_bad_body_limit() -> None:
    model = str(default_model_dir("tiny"))
    result = CliRunner().invoke(router, ["--model", model, "--max-request-bytes", "0"])
    assert result.exit_code == 2, result.output
    assert "--max-request-bytes" in result.output and "must be >= 1" in result.output


def test_router_answers_an_oversized_body_413(redis_server: RedisServer) -> None:
    limit = 4096
    config = RouterConfig(
        model=str(default_model_dir("tiny")),
        scheduler=SchedulerConfig(
            scheduler_host=redis_server.host, scheduler_port=redis_server.port, scheduler_topic="rt413"
        ),
        port=0,
        max_request_bytes=limit,
    )

    async def body() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = Router(config)
        try:
            await server.start(sock)
            url = f"http://127.0.0.1:{server.port}/v1/completions"
            request = {"model": config.model_id, "prompt": "x" * (2 * limit), "max_tokens": 1}
            async with httpx.AsyncClient(timeout=30) as client:
                resp = await client.post(url, content=json.dumps(request))  # with Content-Length

                async def chunks() -> Any:  # no Content-Length: counted as it arrives
                    yield json.dumps(request).encode()

                chunked = await client.post(url, content=chunks())
                small = await client.post(url, json={"model": config.model_id, "prompt": 5})
                metrics = (await client.get(f"http://127.0.0.1:{server.port}/metrics")).text
            for answer in (resp, chunked):
                assert answer.status_code == 413, answer.text
                error = answer.json()["error"]
                assert error["code"] == "request_too_large" and "--max-request-bytes" in error["message"]
            assert small.status_code == 400, small.text  # within the limit: parsed, validated
            [counted] = [line for line in metrics.splitlines() if 'outcome="too_large"' in line]
            assert counted.endswith(" 2.0"), counted
        finally:
            await server.close()

    asyncio.run(body())


@pytest.mark.parametrize("command", [serve, router], ids=["serve", "router"])
def test_both_commands_parse_the_shared_flags(command: click.Command) -> None:
    ctx = command.make_context(
        command.name or "",
        ["--port", "0", "--max-request-bytes", "123", "--served-model-name", "m", "--scheduler-topic", "t"],
    )
    assert ctx.params["port"] == 0 and ctx.params["max_request_bytes"] == 123
    assert ctx.params["served_model_name"] == "m" and ctx.params["scheduler_topic"] == "t"
