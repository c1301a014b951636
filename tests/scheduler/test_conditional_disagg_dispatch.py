"""Conditional disaggregation in the dispatch script, against a real redis-server: the decode node is
booked alone (and prefills locally) for a short prompt, when every prefill queue is past the limit,
or, with that limit set, when no prefill node is live; counted and recorded on the request."""

from __future__ import annotations

import dataclasses

from scheduler_support import booked, booked_decode, booked_prefill, cluster, request_events, run

from scheduler.config import SchedulerConfig
from scheduler.messages import SubmitRequest


def _dispatched(events: list[dict[str, str]]) -> str:
    return [e["detail"] for e in events if e["event"] == "dispatched"][-1]


def test_short_prompt_is_prefilled_on_the_decode_node(config: SchedulerConfig) -> None:
    config = dataclasses.replace(config, disagg_min_prefill_tokens=8)

    async def body() -> None:
        async with cluster(config) as c:
            await c.add_node("p0", "prefill")
            d0 = await c.add_node("d0", "decode", serve=False)
            fe = await c.add_frontend()
            await fe.submit(SubmitRequest(req_id="short", prompt_token_ids=[1] * 7))
            await fe.submit(SubmitRequest(req_id="long", prompt_token_ids=[1] * 8))
            short, long = await d0.agent.next_work(), await d0.agent.next_work()
            assert (short.req_id, short.assignment.mode) == ("short", "mixed")
            assert short.assignment.node_ids == ("d0",)  # P is not involved (nor booked)
            assert (long.req_id, long.assignment.mode) == ("long", "disagg")
            load = await booked(fe)
            assert booked_prefill(load) == {"p0": 8} and booked_decode(load) == {"d0": 2}
            assert fe.stats.get("dispatched_local_short_prompt") == 1
            await fe.cancel("short")
            await fe.flush_records()
            assert _dispatched(await request_events(fe, "short")).startswith("local(short_prompt) p=d0 d=d0")

    run(body())


def test_full_prefill_queues_or_no_prefill_node_go_local(config: SchedulerConfig) -> None:
    config = dataclasses.replace(config, disagg_max_prefill_queue=100)

    async def body() -> None:
        async with cluster(config) as c:
            await c.add_node("p0", "prefill")
            d0 = await c.add_node("d0", "decode", serve=False)
            fe = await c.add_frontend()
            # 120 booked tokens on the only P: past the limit, so the next request stays on D.
            await fe.submit(SubmitRequest(req_id="r0", prompt_token_ids=[1] * 120))
            await fe.submit(SubmitRequest(req_id="r1", prompt_token_ids=[1] * 10))
            r0, r1 = await d0.agent.next_work(), await d0.agent.next_work()
            assert (r0.assignment.mode, r1.assignment.mode) == ("disagg", "mixed")
            assert booked_prefill(await booked(fe)) == {"p0": 120}
            assert fe.stats.get("dispatched_local_prefill_queue") == 1
            await c.nodes["p0"].agent.close()  # deregisters: no live prefill node at all
            await fe.submit(SubmitRequest(req_id="r2", prompt_token_ids=[1] * 10))
            r2 = await d0.agent.next_work()
            assert r2.assignment.mode == "mixed" and r2.assignment.decode_node_id == "d0"
            assert fe.stats.get("dispatched_local_no_prefill") == 1

    run(body())


def test_defaults_keep_every_request_disaggregated(config: SchedulerConfig) -> None:
    async def body() -> None:
        async with cluster(config) as c:
            await c.add_node("p0", "prefill")
            d0 = await c.add_node("d0", "decode", serve=False)
            fe = await c.add_frontend()
            await fe.submit(SubmitRequest(req_id="r0", prompt_token_ids=[1]))
            assert (await d0.agent.next_work()).assignment.mode == "disagg"

    run(body())
