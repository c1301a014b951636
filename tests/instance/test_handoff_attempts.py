"""A re-dispatched attempt that reaches the decode node while the earlier attempt of the same
request still holds or fences its KV reservation (issue #13, item 3: it collided with "request
already holds a KV reservation"). Every piece of a hand-off is keyed by its attempt's hand-off id,
so the retry gets its own reservation at once and the earlier attempt's own fencing frees its
blocks. Driven step by step with the hand-off harness's fakes; the engine part on a real engine."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from splitwise.engine.config import EngineConfig
from splitwise.engine.engine import LLMEngine
from splitwise.engine.errors import InvalidRequestError
from splitwise.engine.sampling_params import SamplingParams
from splitwise.instance.decode_flow import DecodeCapacityError
from splitwise.instance.handoff_state import DecodeState
from splitwise.transfer.errors import TransferTimeoutError
from splitwise.transfer.messages import CancelRequest, PrefillResult, PrefillTask, handoff_id, request_of
from tests.instance.handoff_harness import settle, work_item
from tests.instance.test_handoff_decode import Harness, is_abort, run

S = DecodeState
FIRST, SECOND = handoff_id("r1", 1), handoff_id("r1", 2)


def _start_attempt(h: Harness, attempt: int) -> asyncio.Task[asyncio.Queue]:  # type: ignore[type-arg]
    item = dataclasses.replace(work_item("r1"), attempt=attempt)
    coro = h.flow.start_request(item, list(item.prompt_token_ids), SamplingParams(max_tokens=4))
    return asyncio.get_running_loop().create_task(coro)


def _state(h: Harness, handoff: str) -> S | None:
    rec = h.flow.records.get(handoff)
    return None if rec is None else rec.state


def test_the_hand_off_id_names_request_and_attempt() -> None:
    assert handoff_id("r1", 2) == "r1@2" and request_of("r1@2") == "r1"
    assert request_of(handoff_id("a@b", 0)) == "a@b"  # an id with the separator in it
    assert request_of("plain") == "plain"


def test_second_attempt_gets_its_own_reservation_while_the_first_still_fences() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.start()  # attempt 1: PREFILLING, P never answers
        first_blocks = list(h.worker.reservations[FIRST])
        h.channel.gates.hold("CancelRequest")  # P is slow to confirm the cancel
        second = _start_attempt(h, 2)
        await settle()
        # Attempt 1 is cancelled (superseded) and still fences: its blocks stay reserved.
        assert _state(h, FIRST) is S.CANCELLING
        assert h.worker.reservations[FIRST] == first_blocks
        # Attempt 2 did not wait for it: its own reservation, its own task to P.
        assert _state(h, SECOND) is S.PREFILLING
        second_blocks = h.worker.reservations[SECOND]
        assert not set(second_blocks) & set(first_blocks)
        assert [t.req_id for t in h.channel.of_type(PrefillTask)] == [FIRST, SECOND]
        assert h.target.expected[SECOND] == second_blocks[:3]
        assert [m.req_id for m in h.channel.of_type(CancelRequest)] == [FIRST]
        assert h.count("handoffs_superseded") == 1
        # P confirms the cancel: attempt 1's own fencing frees its blocks, attempt 2 is untouched.
        await h.channel.gates.open("CancelRequest")
        await settle()
        assert is_abort(await asyncio.wait_for(h.started["r1"], 5))
        assert h.worker.calls("release_reservation") == [FIRST]
        assert FIRST not in h.worker.reservations and h.worker.reservations[SECOND] == second_blocks
        # Attempt 2 lands and is admitted with its own reservation.
        h.target.land(SECOND)
        h.flow.on_message(h.conn(), PrefillResult(0, SECOND, 42, -0.25))
        await settle()
        await asyncio.wait_for(second, 5)
        assert h.worker.admitted == {"r1": 42} and h.worker.adopted["r1"] == second_blocks
        assert h.worker.reservations == {}

    run(scenario)


def test_second_attempt_proceeds_when_the_first_is_quarantined() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.start()
        h.channel.refuse[CancelRequest] = TransferTimeoutError("no reply")
        h.target.revoke_confirms = False  # attempt 1 can never be fenced: its blocks stay reserved
        second = _start_attempt(h, 2)
        await settle()
        assert h.count("reservations_quarantined") == 1 and FIRST in h.worker.reservations
        assert _state(h, FIRST) is None and _state(h, SECOND) is S.PREFILLING
        assert SECOND in h.worker.reservations
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)

    run(scenario)


def test_the_same_attempt_twice_is_refused_retryably() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.start()
        with pytest.raises(DecodeCapacityError, match="already being handed off") as raised:
            await asyncio.wait_for(_start_attempt(h, 1), 5)
        assert raised.value.retryable
        assert h.worker.calls("reserve") == [FIRST] and _state(h, FIRST) is S.PREFILLING

    run(scenario)


def test_a_cancel_of_an_earlier_attempt_leaves_the_later_one_running() -> None:
    async def scenario() -> None:
        h = Harness()
        second = _start_attempt(h, 2)
        await settle()
        assert h.flow.cancel("r1", max_attempt=1) is False  # nothing of attempt <= 1 is here
        assert _state(h, SECOND) is S.PREFILLING
        assert h.flow.cancel("r1", max_attempt=2) is True
        await settle()
        assert is_abort(await asyncio.wait_for(second, 5))
        assert h.worker.reservations == {}

    run(scenario)


def test_the_engine_keeps_two_attempts_reservations_apart(tiny_model: Path) -> None:
    """On a real engine: two hand-off ids of one request hold two reservations, the request
    adopts the later one, and the earlier one is released on its own."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model), block_size=4, num_kv_blocks=16))
    prompt = list(range(1, 11))
    first = engine.reserve(FIRST, 16)
    second = engine.reserve(SECOND, 16)
    assert not set(first) & set(second)
    with pytest.raises(InvalidRequestError, match="already exists"):
        engine.reserve(SECOND, 16)
    out = engine.add_prefilled_request(
        "r1", prompt, SamplingParams(max_tokens=3), 5, -0.1, reservation_id=SECOND
    )
    assert out.new_token_ids == [5]
    assert engine.block_manager.has_reservation(FIRST) and not engine.block_manager.has_reservation(SECOND)
    engine.release_reservation(FIRST)
    assert engine.block_manager.num_reserved_blocks == 0
    engine.close()
