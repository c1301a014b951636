"""A frontend as a real process (tests SIGKILL it to orphan the work it accepted)::

    python -m scheduler.sim_frontend --scheduler-port 6390 --req-id r0 --max-tokens 100000

It submits one request, prints ``SUBMITTED <req_id> <decode node id>`` once it is dispatched, then
keeps reading its results until the request ends (prints ``ENDED <type>``) or it is killed.
"""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import click

from scheduler.config import SchedulerConfig, scheduler_options
from scheduler.frontend import FrontendScheduler
from scheduler.messages import SubmitRequest
from scheduler.sim_node import config_args, spawn_module
from splitwise.engine.sampling_params import SamplingParams


async def _main(config: SchedulerConfig, req_id: str, model_id: str, max_tokens: int) -> None:
    fe = FrontendScheduler(config, model_id=model_id)
    await fe.start()
    stream = await fe.submit(
        SubmitRequest(
            req_id=req_id, prompt_token_ids=[1, 2, 3], sampling_params=SamplingParams(max_tokens=max_tokens)
        )
    )
    assignment = fe.inflight[req_id].assignment
    assert assignment is not None
    print(f"SUBMITTED {req_id} {assignment.decode_node_id} {fe.frontend_id}", flush=True)
    async for msg in stream:
        if msg.is_terminal:
            print(f"ENDED {msg.TYPE}", flush=True)
    await fe.close()


@click.command()
@scheduler_options
@click.option("--req-id", default="r0")
@click.option("--model-id", default="sim-model")
@click.option("--max-tokens", type=int, default=100_000)
def main(req_id: str, model_id: str, max_tokens: int, **options: Any) -> None:
    asyncio.run(_main(SchedulerConfig.from_options(options), req_id, model_id, max_tokens))


if __name__ == "__main__":
    main()


def spawn_sim_frontend(
    config: SchedulerConfig, req_id: str, *, max_tokens: int = 100_000
) -> tuple[subprocess.Popen[str], str]:
    """Start this module as a real process; returns it with its ``SUBMITTED ...`` line."""
    args = [*config_args(config), "--req-id", req_id, "--max-tokens", str(max_tokens)]
    return spawn_module("scheduler.sim_frontend", args, "SUBMITTED ")
