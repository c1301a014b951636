"""The decode side of the hand-off, driven step by step with fakes (tests/instance/handoff_harness.py).

Every transition of ``DecodeState`` is reached here, including the races the real-process tests
could only reach by timing: cancel during the reservation, during the transfer and after landing,
P's death, the transfer timeout, and P's result arriving after that timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from splitwise.counters import Counters
from splitwise.engine.errors import InvalidRequestError
from splitwise.engine.outputs import RequestOutput
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import FinishReason
from splitwise.instance.decode_flow import (
    DecodeCapacityError,
    DecodeFlow,
    PrefillUnavailable,
    PromptTooLargeError,
)
from splitwise.instance.handoff_state import DecodeState, IllegalTransitionError
from splitwise.transfer.base import failed
from splitwise.transfer.errors import RemoteError, TransferTimeoutError
from splitwise.transfer.messages import CancelRequest, PrefillFailed, PrefillResult, PrefillTask, handoff_id
from tests.instance.handoff_harness import (
    FakeChannel,
    FakeClock,
    FakeTarget,
    FakeWorker,
    StepOffload,
    decode_config,
    settle,
    work_item,
)

S = DecodeState


def hid(req_id: str = "r1", attempt: int = 1) -> str:
    """The hand-off id D keys a request's attempt by (work_item's attempt is 1)."""
    return handoff_id(req_id, attempt)


class Harness:
    def __init__(self, num_kv_blocks: int = 32, **config: Any) -> None:
        self.worker = FakeWorker(num_kv_blocks)
        self.channel = FakeChannel()
        self.target = FakeTarget()
        self.clock = FakeClock()
        self.counters = Counters()
        self.offload = StepOffload()  # the target's forget / revoke, inline (auto) or stepped
        self.flow = DecodeFlow(
            decode_config(**config),
            self.worker,
            self.channel,
            {"tcp": self.target},
            self.counters,
            clock=self.clock,
            offload=self.offload,
        )
        self.started: dict[str, asyncio.Task[asyncio.Queue[RequestOutput]]] = {}

    async def start(self, req_id: str = "r1", num_prompt_tokens: int = 10, **params: Any) -> None:
        item = work_item(req_id, num_prompt_tokens, **params)
        coro = self.flow.start_request(
            item, list(item.prompt_token_ids), SamplingParams(max_tokens=4, **params)
        )
        self.started[req_id] = asyncio.get_running_loop().create_task(coro)
        await settle()

    def state(self, req_id: str = "r1") -> DecodeState | None:
        rec = self.flow.records.get(hid(req_id))
        return rec.state if rec is not None else None

    def task_sent(self, req_id: str = "r1") -> PrefillTask:
        [task] = [t for t in self.channel.of_type(PrefillTask) if t.req_id == hid(req_id)]
        return task

    def conn(self) -> Any:
        return self.channel.connections["P1"]

    async def reply_landed(self, req_id: str = "r1", token: int = 42) -> None:
        self.target.land(hid(req_id))
        self.flow.on_message(self.conn(), PrefillResult(0, hid(req_id), token, -0.25))
        await settle()

    async def outputs(self, req_id: str = "r1") -> asyncio.Queue[RequestOutput]:
        return await asyncio.wait_for(self.started[req_id], 5)

    def count(self, name: str) -> int:
        return self.counters.get(name)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


def is_abort(out_q: asyncio.Queue[RequestOutput]) -> bool:
    out = out_q.get_nowait()
    return out.finish_reason is FinishReason.ABORT and out.error is None


# --------------------------------------------------------------------------- the happy path


def test_reserve_prefill_land_admit() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.start(temperature=0.0, stop=("x",))
        assert h.state() is S.PREFILLING
        # prompt 10 + headroom 16 = 26 tokens -> 7 blocks reserved, the prompt's 3 sent to P.
        assert h.worker.reservations["r1@1"] == [0, 1, 2, 3, 4, 5, 6]
        task = h.task_sent()
        assert task.dst_block_ids == [0, 1, 2] == h.target.expected["r1@1"]
        assert task.sampling_params == SamplingParams(max_tokens=4, temperature=0.0, stop=("x",))
        await h.clock.advance(0.25)
        await h.reply_landed(token=42)
        out = (await h.outputs()).get_nowait()
        assert out.new_token_ids == [42]
        assert h.worker.admitted == {"r1": 42}
        assert h.state() is None  # the record ended with ADMITTED
        assert h.count("transfers_ok") == 1 and h.count("transfer_latency_ms") == 250
        assert h.flow.last_transfer["r1"].startswith("protocol=tcp blocks=7")
        assert "r1@1" in h.target.forgotten
        assert h.flow.cancel("r1") is False  # the engine owns it now: an abort frees its blocks

    run(scenario)


# --------------------------------------------------------------------------- cancellation


def test_cancel_while_the_reservation_is_being_made_releases_it_once_made() -> None:
    async def scenario() -> None:
        h = Harness()
        h.worker.gates.hold("reserve")
        await h.start()
        assert h.state() is S.RESERVING and h.worker.gates.is_waiting("reserve")
        assert h.flow.cancel("r1") is True
        assert h.state() is S.CANCELLED
        await h.worker.gates.open("reserve")
        assert is_abort(await h.outputs())
        assert h.worker.reservations == {} and h.worker.calls("release_reservation") == ["r1@1"]
        assert h.channel.sent == []  # P never heard of it
        assert h.state() is None

    run(scenario)


def test_cancel_while_waiting_for_free_blocks_stops_waiting() -> None:
    async def scenario() -> None:
        h = Harness(num_kv_blocks=8)
        await h.start("big", num_prompt_tokens=20)  # 20 + 16 tokens -> all 8 blocks... 9 wanted: capped
        assert h.state("big") is S.PREFILLING
        await h.start("r1")
        assert h.state() is S.RESERVING and h.count("reserve_waits") == 1
        assert h.flow.num_waiting_for_blocks == 1
        await h.clock.advance(0.005)  # the back-off elapses: one more try, still full
        assert h.count("reserve_waits") == 2
        assert h.flow.cancel("r1") is True
        await h.clock.advance(1.0)
        assert is_abort(await h.outputs())
        assert h.count("reserve_waits") == 2 and h.flow.num_waiting_for_blocks == 0
        assert "r1@1" not in h.worker.reservations

    run(scenario)


def test_cancel_during_the_transfer_releases_blocks_only_once_p_confirmed() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.start()
        h.channel.gates.hold("CancelRequest")
        assert h.flow.cancel("r1") is True
        await settle()
        assert h.state() is S.CANCELLING
        assert "r1@1" in h.target.forgotten  # the target refuses further writes from now on
        [cancel] = h.channel.of_type(CancelRequest)
        assert cancel.req_id == "r1@1"
        assert is_abort(await h.outputs())
        # P has not confirmed: a one-sided write may still land, so the blocks stay reserved.
        assert h.worker.reservations["r1@1"] == [0, 1, 2, 3, 4, 5, 6]
        await h.channel.gates.open("CancelRequest")
        assert h.worker.reservations == {} and h.state() is None
        assert h.count("fallbacks") == 0 and h.count("transfer_failures") == 0
        # P's reply, arriving now, is late and only counted.
        h.flow.on_message(h.conn(), PrefillFailed(0, "r1@1", "aborted", True))
        assert h.count("late_prefill_replies") == 1

    run(scenario)


def test_cancel_not_confirmed_closes_the_connection_then_releases() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.start()
        h.channel.refuse[CancelRequest] = TransferTimeoutError("no reply")
        h.flow.cancel("r1")
        await settle()
        assert h.conn().closed_reason == "cancel not confirmed"
        assert h.worker.reservations == {} and h.state() is None

    run(scenario)


def test_cancel_after_landing_releases_at_once_and_never_admits() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.start()
        h.target.land("r1@1")
        h.flow.on_message(h.conn(), PrefillResult(0, "r1@1", 42, -0.25))
        assert h.state() is S.LANDED
        assert h.flow.cancel("r1") is True  # before the driver ran again
        assert h.state() is S.CANCELLED
        await settle()
        assert is_abort(await h.outputs())
        assert h.worker.admitted == {} and h.worker.reservations == {}
        assert h.channel.of_type(CancelRequest) == []  # every write had landed: nothing to stop

    run(scenario)


def test_cancel_of_an_unknown_request_is_the_engines() -> None:
    async def scenario() -> None:
        h = Harness()
        assert h.flow.cancel("nope") is False

    run(scenario)


# --------------------------------------------------------------------------- failures -> fallback


def test_prefill_node_death_falls_back_to_local_prefill() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.start()
        h.conn().closed_reason = "peer closed"
        h.flow.on_peer_lost("P1")
        assert h.state() is S.FALLING_BACK
        out_q = await h.outputs()
        assert out_q is h.worker.outputs["r1"] and h.worker.submitted["r1"][2] is False
        await settle()
        assert h.worker.reservations == {} and h.state() is None  # FELL_BACK
        assert h.count("fallbacks") == 1 and h.count("transfer_failures") == 1
        assert h.channel.of_type(CancelRequest) == []  # the connection is gone: P cannot write
        # A cancel now reaches the engine (the local request), not this flow.
        assert h.flow.cancel("r1") is False

    run(scenario)


def test_a_cancel_right_after_the_fallback_started_is_the_engines() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.start()
        h.channel.gates.hold("CancelRequest")
        h.flow.on_message(h.conn(), PrefillFailed(0, "r1@1", "oom", True))
        assert h.state() is S.FALLING_BACK and h.worker.calls("submit") == ["r1"]
        # The local request was queued in the same step: an engine abort now follows it.
        assert h.flow.cancel("r1") is False
        await h.channel.gates.open("CancelRequest")
        assert h.state() is None and h.worker.reservations == {}

    run(scenario)


def test_transfer_timeout_falls_back_and_a_late_result_is_only_counted() -> None:
    async def scenario() -> None:
        h = Harness(transfer_timeout_s=5.0)
        await h.start()
        rec = h.flow.records["r1@1"]
        await h.clock.advance(4.9)
        assert h.state() is S.PREFILLING
        await h.clock.advance(0.1)
        assert ("timeout", S.FALLING_BACK) in rec.history and rec.state is S.FELL_BACK
        assert h.worker.calls("submit") == ["r1"]
        assert h.worker.reservations == {}
        await h.reply_landed()  # P finally answers
        assert h.count("late_prefill_replies") == 1
        assert h.worker.admitted == {} and h.count("transfers_ok") == 0
        assert h.count("fallbacks") == 1

    run(scenario)


def test_result_without_every_write_landed_falls_back() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.start()
        h.target.status["r1@1"] = failed("count mismatch")
        h.flow.on_message(h.conn(), PrefillResult(0, "r1@1", 42, -0.25))
        assert h.state() is S.FALLING_BACK
        assert "count mismatch" in h.flow.records["r1@1"].reason
        await settle()
        assert h.worker.admitted == {} and h.count("fallbacks") == 1

    run(scenario)


def test_unreachable_prefill_node_falls_back_and_releases_at_once() -> None:
    async def scenario() -> None:
        h = Harness()
        h.channel.unreachable.add("P1")
        await h.start()
        await h.outputs()
        assert h.worker.calls("submit") == ["r1"] and h.worker.reservations == {}
        assert h.channel.sent == [] and h.state() is None

    run(scenario)


def test_prefill_node_refusing_the_task_falls_back() -> None:
    async def scenario() -> None:
        h = Harness()
        h.channel.refuse[PrefillTask] = RemoteError("peer refused prefill_task: busy")
        await h.start()
        await h.outputs()
        assert h.count("fallbacks") == 1
        assert [m.req_id for m in h.channel.of_type(CancelRequest)] == ["r1@1"]
        assert h.worker.reservations == {}

    run(scenario)


def test_with_pd_fallback_fail_the_request_fails_after_p_stopped() -> None:
    async def scenario() -> None:
        h = Harness(pd_fallback="fail")
        await h.start()
        h.flow.on_message(h.conn(), PrefillFailed(0, "r1@1", "oom", True))
        assert h.state() is S.FAILING
        with pytest.raises(PrefillUnavailable, match="oom"):
            await h.outputs()
        await settle()
        assert h.state() is None and h.worker.reservations == {}
        assert h.count("fallbacks") == 0 and h.count("transfer_failures") == 1
        assert h.worker.calls("submit") == []
        assert h.flow.cancel("r1") is False

    run(scenario)


# --------------------------------------------------------------------------- refusals before P


def test_prompt_larger_than_the_whole_cache_fails_without_waiting() -> None:
    async def scenario() -> None:
        h = Harness(num_kv_blocks=4)
        await h.start(num_prompt_tokens=16)
        with pytest.raises(PromptTooLargeError, match="whole cache has 4"):
            await h.outputs()
        assert h.worker.calls("reserve") == [] and h.state() is None

    run(scenario)


def test_bad_prompt_and_full_queue_are_refused() -> None:
    async def scenario() -> None:
        h = Harness(num_kv_blocks=8, max_waiting_for_blocks=1)
        h.worker.invalid_prompts.add(tuple(range(1, 4)))
        await h.start("bad", num_prompt_tokens=3)
        with pytest.raises(InvalidRequestError):
            await h.outputs("bad")
        await h.start("big", num_prompt_tokens=20)
        await h.start("waits")
        assert h.state("waits") is S.RESERVING
        await h.start("refused")
        with pytest.raises(DecodeCapacityError):
            await h.outputs("refused")
        assert h.state("refused") is None and h.state("waits") is S.RESERVING
        h.flow.cancel("waits")
        await h.clock.advance(1.0)

    run(scenario)


def test_a_second_hand_off_of_the_same_request_is_refused() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.start()
        h.started["r1-again"] = h.started["r1"]
        item = work_item("r1")
        with pytest.raises(Exception, match="already being handed off"):
            await h.flow.start_request(item, list(item.prompt_token_ids), SamplingParams())
        assert h.state() is S.PREFILLING

    run(scenario)


# --------------------------------------------------------------------------- the state machine


def test_an_illegal_transition_is_rejected_logged_and_counted() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.start()
        rec = h.flow.records["r1@1"]
        with pytest.raises(IllegalTransitionError, match="prefilling -> admitted"):
            h.flow.transitions.move(rec, S.ADMITTED, "admitted")
        assert rec.state is S.PREFILLING and h.count("illegal_transitions") == 1
        await h.reply_landed()
        await h.outputs()
        assert [state for _, state in rec.history] == [S.PREFILLING, S.LANDED, S.ADMITTED]

    run(scenario)


def test_cancel_while_p_has_not_acknowledged_the_task_does_not_wait_for_the_ack() -> None:
    async def scenario() -> None:
        h = Harness()
        h.channel.gates.hold("PrefillTask")  # P is wedged: no Ack
        await h.start()
        assert h.state() is S.PREFILLING and h.channel.gates.is_waiting("PrefillTask")
        h.flow.cancel("r1")
        assert is_abort(await h.outputs())
        await settle()
        assert [m.req_id for m in h.channel.of_type(CancelRequest)] == ["r1@1"]
        assert h.worker.reservations == {} and h.state() is None
        await h.channel.gates.open("PrefillTask")  # the Ack finally comes: nothing changes
        assert h.count("illegal_transitions") == 0 and h.count("fallbacks") == 0

    run(scenario)


def test_cancel_while_connecting_to_p_never_sends_the_task() -> None:
    async def scenario() -> None:
        h = Harness()
        h.channel.gates.hold("connect")
        await h.start()
        h.flow.cancel("r1")
        await settle()
        assert h.worker.reservations == {}  # P was never told: nothing can write
        await h.channel.gates.open("connect")
        assert h.channel.sent == [] and is_abort(await h.outputs())

    run(scenario)


def test_a_protocol_this_node_does_not_offer_falls_back_at_once() -> None:
    async def scenario() -> None:
        h = Harness()
        h.flow.targets.clear()  # e.g. the rdma NIC disappeared after registration
        await h.start()
        await h.outputs()
        assert h.worker.calls("submit") == ["r1"] and h.channel.sent == []
        await settle()
        assert h.worker.reservations == {} and h.count("fallbacks") == 1

    run(scenario)
