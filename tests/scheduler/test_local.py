"""--scheduler-name local: the same frontend/node contract in-process, without Redis."""

from __future__ import annotations

import asyncio

import pytest
from scheduler_support import run

from scheduler.config import SchedulerConfig
from scheduler.errors import NoCapacityError
from scheduler.local import LocalScheduler
from scheduler.messages import Cancelled, Expired, Finished, SubmitRequest, TokenChunk
from scheduler.sim_node import SimBehavior, SimNode, make_node_info, sim_token


def test_local_scheduler_serves_expires_and_cancels() -> None:
    async def body() -> None:
        sched = LocalScheduler(
            SchedulerConfig(scheduler_name="local", heartbeat_interval_s=0.05), model_id="sim-model"
        )
        await sched.frontend.start()
        with pytest.raises(NoCapacityError):
            await sched.frontend.submit(SubmitRequest(req_id="r0", prompt_token_ids=[1]))
        with pytest.raises(ValueError, match="mixed"):
            await sched.node.start(make_node_info("p", "prefill"))
        await sched.node.start(make_node_info("local", "mixed"))
        sim = SimNode(sched.node, SimBehavior(num_tokens=3))  # type: ignore[arg-type]
        runner = asyncio.create_task(sim.run())
        msgs = await (
            await sched.frontend.submit(SubmitRequest(req_id="r1", prompt_token_ids=[4, 5]))
        ).collect()
        assert [t for m in msgs if isinstance(m, TokenChunk) for t in m.token_ids] == [
            sim_token([4, 5], i) for i in range(3)
        ]
        assert isinstance(msgs[-1], Finished)
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        # nobody serves now: one request expires, one is cancelled, and the node is told about both
        expiring = await sched.frontend.submit(SubmitRequest(req_id="r2", prompt_token_ids=[1], ttl_s=0.1))
        cancelled = await sched.frontend.submit(SubmitRequest(req_id="r3", prompt_token_ids=[1]))
        assert await sched.frontend.cancel("r3") is True
        assert await cancelled.collect() == [Cancelled(req_id="r3", attempt=0)]
        assert await expiring.collect() == [Expired(req_id="r2", attempt=0)]
        assert sched.node.is_cancelled("r3", 0)
        reasons = set()
        it = sched.node.cancellations()
        for _ in range(2):
            reasons.add((await it.__anext__()).reason)
        assert reasons == {"cancelled", "expired"}
        await sched.frontend.close()
        await sched.node.close()

    run(body())


def test_both_implementations_satisfy_the_protocols() -> None:
    from scheduler.frontend import FrontendScheduler
    from scheduler.interfaces import FrontendSide, NodeSide
    from scheduler.node import NodeAgent

    config = SchedulerConfig()
    local = LocalScheduler(config)
    frontends: list[FrontendSide] = [FrontendScheduler(config, model_id="m"), local.frontend]
    nodes: list[NodeSide] = [NodeAgent(config), local.node]
    for side, proto in [(f, FrontendSide) for f in frontends] + [(n, NodeSide) for n in nodes]:
        missing = [name for name in proto.__dict__ if not name.startswith("_") and not hasattr(side, name)]
        assert missing == [], (type(side).__name__, missing)
