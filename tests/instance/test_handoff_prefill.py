"""The prefill side of the hand-off, driven step by step with fakes (tests/instance/handoff_harness.py).

Every transition of ``PrefillState`` is reached, and the blocks each layer ships are exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from splitwise.counters import Counters
from splitwise.engine.errors import InvalidRequestError
from splitwise.engine.model_runner import ScheduledChunk
from splitwise.engine.sampling_params import SamplingParams
from splitwise.instance.handoff_state import PrefillState
from splitwise.instance.prefill_flow import PrefillFlow
from splitwise.transfer.base import COMPLETED, DONE, failed
from splitwise.transfer.messages import CancelRequest, PrefillFailed, PrefillResult, PrefillTask
from tests.instance.handoff_harness import (
    FakeChannel,
    FakeConnection,
    FakeInitiator,
    FakeTarget,
    FakeWorker,
    StepOffload,
    settle,
)

S = PrefillState
PARAMS = SamplingParams(max_tokens=4, temperature=0.0, stop_token_ids=(5,))
ENDPOINT = FakeTarget().endpoint()


@dataclass
class FakeSeq:
    req_id: str
    block_table: list[int]
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass
class Harness:
    pipelined: bool = True
    worker: FakeWorker = field(default_factory=FakeWorker)
    channel: FakeChannel = field(default_factory=FakeChannel)
    initiator: FakeInitiator = field(default_factory=FakeInitiator)
    offload: StepOffload = field(default_factory=StepOffload)
    counters: Counters = field(default_factory=Counters)
    released: list[str] = field(default_factory=list)
    conn: FakeConnection = field(default_factory=lambda: FakeConnection("D1"))

    def __post_init__(self) -> None:
        async def release_booking(req_id: str) -> None:
            self.released.append(req_id)

        self.flow = PrefillFlow(
            self.worker,
            self.channel,
            {"tcp": self.initiator},
            self.counters,
            release_booking=release_booking,
            pipelined=self.pipelined,
            offload=self.offload,
        )

    async def task(self, req_id: str = "r1", dst: list[int] | None = None, protocol: str = "tcp") -> None:
        message = PrefillTask(0, req_id, list(range(10)), PARAMS, dst or [20, 21, 22], protocol, ENDPOINT)
        self.flow.handle(self.conn, message)
        await settle()

    def state(self, req_id: str = "r1") -> PrefillState | None:
        rec = self.flow.records.get(req_id)
        return rec.state if rec is not None else None

    def layer(self, layer: int, seq: FakeSeq, num_new_tokens: int, ready: Any = COMPLETED) -> None:
        assert self.worker.layer_callback is not None
        chunk = cast(ScheduledChunk, ScheduledChunk(seq=cast(Any, seq), num_new_tokens=num_new_tokens))
        self.worker.layer_callback(layer, [chunk], ready)


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


def test_prefill_ship_drain_reply() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.task()
        assert h.state() is S.PREFILLING and h.initiator.connected == ["D1"]
        assert h.worker.submitted["r1"] == (list(range(10)), PARAMS, True)
        seq = FakeSeq("r1", block_table=[7, 8, 9])
        h.layer(0, seq, 6)  # tokens 0..5: blocks 0..1 (block 1 partial)
        seq.num_computed_tokens = 6
        h.layer(0, seq, 4)  # tokens 6..9: blocks 1..2 (block 1 again, complete now)
        assert h.initiator.writes == [("r1", 0, [7, 8], [20, 21]), ("r1", 0, [8, 9], [21, 22])]
        h.initiator.verdict["r1"] = DONE
        h.worker.finish_prefill("r1", first_token_id=7, logprob=-0.5)
        await settle()
        assert h.initiator.finished == ["r1"] and "r1" in h.initiator.forgotten
        assert h.worker.calls("release_prefill") == ["r1"]
        [reply] = h.channel.sent
        assert reply == PrefillResult(0, "r1", 7, -0.5)
        assert h.released == ["r1"] and h.state() is None
        assert h.counters.get("prefills_shipped") == 1
        h.layer(1, seq, 4)  # a late layer of a finished request ships nothing
        assert len(h.initiator.writes) == 2

    run(scenario)


def test_first_chunk_after_a_prefix_cache_hit_ships_the_cached_blocks_too() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.task()
        seq = FakeSeq("r1", block_table=[3, 4, 5], num_computed_tokens=8, num_cached_tokens=8)
        h.layer(0, seq, 2)
        assert h.initiator.writes == [("r1", 0, [3, 4, 5], [20, 21, 22])]

    run(scenario)


def test_unpipelined_mode_ships_every_layer_after_the_prefill() -> None:
    async def scenario() -> None:
        h = Harness(pipelined=False)
        await h.task()
        seq = FakeSeq("r1", block_table=[7, 8, 9])
        h.layer(0, seq, 10)
        h.layer(1, seq, 10)
        assert h.initiator.writes == []
        h.initiator.verdict["r1"] = DONE
        h.worker.finish_prefill("r1")
        await settle()
        assert [w[1] for w in h.initiator.writes] == [0, 1]
        assert isinstance(h.channel.sent[0], PrefillResult)

    run(scenario)


def test_cancel_mid_prefill_stops_shipping_at_once() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.task()
        seq = FakeSeq("r1", block_table=[7, 8, 9])
        h.layer(0, seq, 10)
        h.flow.handle(h.conn, CancelRequest(0, "r1", "decode gave up"))
        assert h.state() is S.CANCELLED
        h.layer(1, seq, 10)  # the engine thread's next layer: nothing new is issued
        assert len(h.initiator.writes) == 1
        assert h.worker.calls("abort") == ["r1"]
        await settle()
        assert "r1" in h.initiator.forgotten
        assert h.channel.sent == []  # D gave up: nobody waits for a reply
        assert h.released == ["r1"] and h.state() is None

    run(scenario)


def test_cancel_while_draining_frees_p_blocks_without_a_reply() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.task()
        h.offload.auto = False  # the transport's wait is now held until the test runs it
        h.worker.finish_prefill("r1")
        await settle()
        assert h.state() is S.DRAINING and h.initiator.finished == ["r1"]
        h.flow.cancel("r1", "client went away")
        await h.offload.run_next()  # the wait returns (forget made it return at once)
        while h.offload.pending:
            await h.offload.run_next()
        assert h.worker.calls("release_prefill") == ["r1"]
        assert h.channel.sent == [] and h.released == ["r1"] and h.state() is None

    run(scenario)


def test_cancel_while_connecting_never_submits() -> None:
    async def scenario() -> None:
        h = Harness()
        h.offload.auto = False
        await h.task()
        assert h.state() is S.CONNECTING
        h.flow.cancel("r1")
        await h.offload.run_next()
        assert h.worker.submitted == {} and h.state() is None and h.released == ["r1"]

    run(scenario)


def test_transfer_failure_is_reported_to_d() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.task()
        h.initiator.verdict["r1"] = failed("connection lost mid-transfer")
        h.worker.finish_prefill("r1")
        await settle()
        [reply] = h.channel.sent
        assert isinstance(reply, PrefillFailed) and "connection lost" in reply.reason
        assert h.counters.get("prefill_failures") == 1
        assert h.worker.calls("release_prefill") == ["r1"]

    run(scenario)


def test_an_engine_abort_from_outside_fails_the_prefill() -> None:
    async def scenario() -> None:
        h = Harness()
        await h.task()
        h.worker.abort("r1")  # the node runtime's abort (the client went away), not via the flow
        await settle()
        [reply] = h.channel.sent
        assert isinstance(reply, PrefillFailed)
        assert h.state() is None and "r1" in h.initiator.forgotten

    run(scenario)


def test_refusals_before_the_ack() -> None:
    async def scenario() -> None:
        h = Harness()
        with pytest.raises(InvalidRequestError, match="no 'rdma' transport"):
            await h.task(protocol="rdma")
        await h.task()
        with pytest.raises(InvalidRequestError, match="already being prefilled"):
            await h.task()
        assert list(h.flow.records) == ["r1"]
        h.flow.cancel("unknown")  # a cancel for something never seen is a no-op

    run(scenario)
