"""Stopping background loops without cancelling them mid-command.

Our loops park in blocking Redis reads (XREAD/XREADGROUP BLOCK). Cancelling such a read can leave
its pooled connection (and the cancelled task) stuck, so ``close()`` sets a stop flag, lets each loop
return when its BLOCK ends (at most ``block_ms``), and cancels only what is still running after that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from splitwise.logging import get_logger

log = get_logger("scheduler.tasks")


async def stop_tasks(tasks: Iterable[asyncio.Task[None]], *, grace_s: float) -> None:
    pending = {t for t in tasks if not t.done()}
    if not pending:
        return
    _done, pending = await asyncio.wait(pending, timeout=grace_s)
    for task in pending:
        task.cancel()
    if pending:
        _done, stuck = await asyncio.wait(pending, timeout=1.0)
        for task in stuck:
            log.error("task_did_not_stop", task=task.get_name())
