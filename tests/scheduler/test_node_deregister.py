"""An instance whose engine is lost (issue #14) deregisters before failing what it holds:
``NodeAgent.deregister`` takes it out of dispatch at once but keeps it connected, so its
retryable failure still reaches the frontend, which re-dispatches to another node with the
tokens already delivered. Real redis-server; both nodes are driven by the test."""

from __future__ import annotations

import redis.asyncio as redis
from scheduler_support import cluster, run

from scheduler.config import SchedulerConfig
from scheduler.messages import Failed, Finished, SubmitRequest, TokenChunk
from splitwise.codes import FailureCode


def test_deregistered_node_fails_retryable_and_the_request_resumes_elsewhere(config: SchedulerConfig) -> None:
    async def body() -> None:
        async with cluster(config) as c:
            lost = (await c.add_node("m0", "mixed", serve=False)).agent
            fe = await c.add_frontend()
            stream = await fe.submit(
                SubmitRequest(req_id="r0", prompt_token_ids=[1, 2], sampling_params={"max_tokens": 3})
            )
            first = await lost.next_work()
            await lost.publish(TokenChunk(req_id="r0", attempt=first.attempt, index=0, token_ids=[10]))
            # The only other node joins now: the re-dispatch can only land there.
            other = (await c.add_node("m1", "mixed", serve=False)).agent
            await lost.deregister()
            await lost.deregister()  # idempotent
            message = "engine lost: rank 1 is gone"
            await lost.publish(
                Failed(
                    req_id="r0",
                    attempt=first.attempt,
                    code=FailureCode.ENGINE_ERROR,
                    message=message,
                    retryable=True,
                )
            )
            await lost.ack(first)
            second = await other.next_work()
            assert second.attempt == first.attempt + 1 and second.resume_token_ids == [10]
            await other.publish(TokenChunk(req_id="r0", attempt=second.attempt, index=1, token_ids=[11, 12]))
            await other.publish(
                Finished(
                    req_id="r0",
                    attempt=second.attempt,
                    finish_reason="length",
                    prompt_tokens=2,
                    completion_tokens=3,
                )
            )
            await other.ack(second)
            msgs = await stream.collect()
            tokens = [t for m in msgs if isinstance(m, TokenChunk) for t in m.token_ids]
            assert tokens == [10, 11, 12] and isinstance(msgs[-1], Finished)
            assert fe.stats.get("redispatched") == 1
            # Gone from the registry and the live set (no frontend dispatches to it again).
            client = redis.Redis(port=config.scheduler_port)
            try:
                alive = [m.decode() for m in await client.zrange(fe.keys.alive, 0, -1)]
                assert not await client.hexists(fe.keys.nodes, "m0")
            finally:
                await client.aclose()
            assert [m.split("|")[0] for m in alive] == ["m1"]

    run(body())
