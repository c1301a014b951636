"""A stream never finishes as a success with a token missing (issue #13, item 1): a chunk whose index
skips tokens (writes lost in a Redis failover or restart) makes the frontend re-dispatch from what
the client has, and the resumed attempt fills the gap. Real redis-server; the node is driven by
the test."""

from __future__ import annotations

from scheduler_support import cluster, run

from scheduler.config import SchedulerConfig
from scheduler.messages import Finished, SubmitRequest, TokenChunk


def test_token_gap_is_redispatched_and_the_client_sees_every_token_once(config: SchedulerConfig) -> None:
    async def body() -> None:
        async with cluster(config) as c:
            node = (await c.add_node("m0", "mixed", serve=False)).agent
            fe = await c.add_frontend()
            stream = await fe.submit(
                SubmitRequest(req_id="r0", prompt_token_ids=[1, 2], sampling_params={"max_tokens": 4})
            )
            first = await node.next_work()
            await node.publish(TokenChunk(req_id="r0", attempt=first.attempt, index=0, token_ids=[10]))
            # index 2: the chunk with token 1 was lost
            await node.publish(TokenChunk(req_id="r0", attempt=first.attempt, index=2, token_ids=[12]))
            second = await node.next_work()
            assert second.attempt == first.attempt + 1 and second.resume_token_ids == [10]
            await node.ack(first)
            await node.publish(
                TokenChunk(req_id="r0", attempt=second.attempt, index=1, token_ids=[11, 12, 13])
            )
            await node.publish(
                Finished(
                    req_id="r0",
                    attempt=second.attempt,
                    finish_reason="length",
                    prompt_tokens=2,
                    completion_tokens=4,
                )
            )
            await node.ack(second)
            msgs = await stream.collect()
            tokens = [t for m in msgs if isinstance(m, TokenChunk) for t in m.token_ids]
            assert tokens == [10, 11, 12, 13] and isinstance(msgs[-1], Finished)
            assert fe.stats.get("token_gaps") == 1 and fe.stats.get("redispatched") == 1

    run(body())


def test_missing_last_tokens_before_a_finished_are_redispatched(config: SchedulerConfig) -> None:
    async def body() -> None:
        async with cluster(config) as c:
            node = (await c.add_node("m0", "mixed", serve=False)).agent
            fe = await c.add_frontend()
            stream = await fe.submit(
                SubmitRequest(req_id="r1", prompt_token_ids=[3], sampling_params={"max_tokens": 3})
            )
            first = await node.next_work()
            await node.publish(TokenChunk(req_id="r1", attempt=first.attempt, index=0, token_ids=[20]))
            # tokens 1 and 2 were lost; the terminal says 3 were produced
            await node.publish(
                Finished(
                    req_id="r1",
                    attempt=first.attempt,
                    finish_reason="length",
                    prompt_tokens=1,
                    completion_tokens=3,
                )
            )
            await node.ack(first)
            second = await node.next_work()
            assert second.resume_token_ids == [20]
            await node.publish(TokenChunk(req_id="r1", attempt=second.attempt, index=1, token_ids=[21, 22]))
            await node.publish(
                Finished(
                    req_id="r1",
                    attempt=second.attempt,
                    finish_reason="length",
                    prompt_tokens=1,
                    completion_tokens=3,
                )
            )
            await node.ack(second)
            msgs = await stream.collect()
            assert [t for m in msgs if isinstance(m, TokenChunk) for t in m.token_ids] == [20, 21, 22]
            assert isinstance(msgs[-1], Finished) and fe.stats.get("token_gaps") == 1

    run(body())
