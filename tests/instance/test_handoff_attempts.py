"""A re-dispatched attempt that reaches the decode node while the earlier attempt of the same
request still fences its KV reservation (issue #13, item 3: it collided with "request already
holds a KV reservation"). Driven step by step with the hand-off harness's fakes."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from splitwise.engine.sampling_params import SamplingParams
from splitwise.instance.decode_flow import DecodeCapacityError
from splitwise.instance.handoff_state import DecodeState
from splitwise.transfer.messages import CancelRequest, PrefillTask
from tests.instance.handoff_harness import settle, work_item
from tests.instance.test_handoff_decode import Harness, is_abort, run

S = DecodeState


def _second_attempt(h: Harness) -> asyncio.Task[asyncio.Queue]:  # type: ignore[type-arg]
    item = dataclasses.replace(work_item("r1"), attempt=2)
    coro = h.flow.start_request(item, list(item.prompt_token_ids), SamplingParams(max_tokens=4))
    return asyncio.get_running_loop().create_task(coro)


def test_second_attempt_waits_until_the_first_released_its_reservation() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.start()  # attempt 1: PREFILLING, P never answers
        h.channel.gates.hold("CancelRequest")  # P is slow to confirm the cancel
        second = _second_attempt(h)
        await settle()
        assert h.state() is S.CANCELLING and not second.done()
        assert "r1" in h.worker.reservations  # not released before P confirmed
        assert len(h.channel.of_type(PrefillTask)) == 1
        await h.channel.gates.open("CancelRequest")
        await settle()
        assert is_abort(await h.outputs())  # attempt 1 ended as a cancel
        assert h.worker.calls("release_reservation") == ["r1"]
        assert h.worker.calls("reserve") == ["r1", "r1"] and h.state() is S.PREFILLING
        assert [t.req_id for t in h.channel.of_type(PrefillTask)] == ["r1", "r1"]
        assert len(h.channel.of_type(CancelRequest)) == 1
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)

    run(scenario)


def test_second_attempt_is_refused_retryably_when_the_first_cannot_let_go() -> None:
    async def scenario() -> None:
        h = Harness(transfer_timeout_s=0.05)
        await h.start()
        h.channel.gates.hold("CancelRequest")
        second = _second_attempt(h)
        with pytest.raises(DecodeCapacityError, match="already being handed off") as raised:
            await asyncio.wait_for(second, 5)
        assert raised.value.retryable  # the frontend places the request elsewhere
        assert h.worker.calls("reserve") == ["r1"]
        await h.channel.gates.open("CancelRequest")

    run(scenario)
