"""Fenced cancels (#11) and the other branches' behaviour inside the hand-off state machines,
driven step by step with the deterministic harness (tests/instance/handoff_harness.py).

D releases a reservation only after P's acknowledgement (``p_stopped``), else after a confirmed
``revoke`` (``revoked``), else never (QUARANTINED). P acknowledges a cancel only once its
initiator's ``forget`` returned, aborts every transport to a D it lost, passes each layer's ready
token through (deferred writes too), measures the transfer from its first write, and sends the
first token's top logprobs to D, which admits with them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, cast

from splitwise.instance.handoff_state import DecodeState, PrefillState
from splitwise.instance.transfer_metrics import TransferMetrics
from splitwise.transfer import messages
from splitwise.transfer.base import DONE
from splitwise.transfer.errors import TransferTimeoutError
from splitwise.transfer.messages import CancelRequest, PrefillResult, PrefillTask
from tests.instance.handoff_harness import settle
from tests.instance.test_handoff_decode import Harness as DHarness
from tests.instance.test_handoff_decode import is_abort, run
from tests.instance.test_handoff_prefill import ENDPOINT, PARAMS, FakeSeq
from tests.instance.test_handoff_prefill import Harness as PHarness

D = DecodeState
P = PrefillState
RESERVED = [0, 1, 2, 3, 4, 5, 6]  # prompt 10 + headroom 16 tokens, block size 4


# --------------------------------------------------------------------------- D: release / revoke / quarantine


def test_d_releases_after_the_acknowledgement_without_revoking() -> None:
    async def scenario() -> None:
        h = DHarness()
        await h.start()
        rec = h.flow.records["r1@1"]
        h.flow.cancel("r1")
        await settle()
        assert is_abort(await h.outputs())
        assert h.target.revoked == [] and h.worker.reservations == {}
        assert rec.history[-1] == ("p_stopped", D.CANCELLED)

    run(scenario)


def test_d_revokes_an_unanswering_p_before_releasing() -> None:
    async def scenario() -> None:
        h = DHarness()
        await h.start()
        rec = h.flow.records["r1@1"]
        h.channel.refuse[CancelRequest] = TransferTimeoutError("no reply")
        h.offload.auto = False  # the target's forget, then its revoke, are held until run_next
        h.flow.cancel("r1")
        await settle()
        await h.offload.run_next()  # forget
        assert h.conn().closed_reason == "cancel not confirmed"
        assert h.worker.reservations["r1@1"] == RESERVED  # not before the revoke returned
        await h.offload.run_next()  # revoke
        assert h.target.revoked == ["P1"] and h.worker.reservations == {}
        assert rec.history[-1] == ("revoked", D.CANCELLED)
        assert h.count("reservations_quarantined") == 0

    run(scenario)


def test_d_quarantines_the_blocks_when_the_revoke_cannot_be_confirmed() -> None:
    async def scenario() -> None:
        h = DHarness()
        await h.start()
        rec = h.flow.records["r1@1"]
        h.channel.refuse[CancelRequest] = TransferTimeoutError("no reply")
        h.target.revoke_confirms = False
        h.flow.cancel("r1")
        await settle()
        assert h.target.revoked == ["P1"]
        assert h.worker.reservations["r1@1"] == RESERVED  # never released
        assert h.worker.calls("release_reservation") == []
        assert rec.state is D.QUARANTINED and h.state() is None
        assert h.count("reservations_quarantined") == 1

    run(scenario)


def test_d_revokes_a_lost_p_before_the_fallback_releases_the_old_reservation() -> None:
    async def scenario() -> None:
        h = DHarness()
        await h.start()
        rec = h.flow.records["r1@1"]
        h.conn().closed_reason = "peer closed"
        h.flow.on_peer_lost("P1")
        await settle()
        assert h.worker.calls("submit") == ["r1"]  # prefilled locally
        assert h.channel.of_type(CancelRequest) == []  # nobody to ask: the connection is gone
        assert h.target.revoked == ["P1"]
        assert rec.history[-1] == ("revoked", D.FELL_BACK)
        assert "r1@1" not in h.worker.reservations

    run(scenario)


def test_d_admits_with_p_top_logprobs_and_prompt_logprobs() -> None:
    async def scenario() -> None:
        h = DHarness()
        await h.start()
        h.target.land("r1@1")
        result = PrefillResult(
            0,
            "r1@1",
            42,
            -0.25,
            top_token_ids=[42, 3],
            top_logprobs=[-0.25, -2.0],
            prompt_logprobs=[-1.5],
            prompt_top_token_ids=[[9]],
            prompt_top_logprobs=[[-0.5]],
        )
        h.flow.on_message(h.conn(), result)
        await settle()
        await h.outputs()
        tops, prompt = h.worker.admitted_extras["r1"]
        assert tops == [(42, -0.25), (3, -2.0)]
        assert prompt is not None and len(prompt) == 1  # one entry per prompt token after the first

    run(scenario)


# --------------------------------------------------------------------------- P: fence, abort, ready, metrics


def test_p_acknowledges_a_cancel_only_once_forget_returned() -> None:
    async def scenario() -> None:
        h = PHarness()
        await h.task()
        h.layer(0, FakeSeq("r1", block_table=[7, 8, 9]), 10)
        h.offload.auto = False
        fence = h.flow.handle(h.conn, CancelRequest(0, "r1", "decode gave up"))
        assert fence is not None and h.state() is P.CANCELLED
        waiter = asyncio.ensure_future(fence)
        await settle()
        assert not waiter.done() and h.initiator.forgotten == []  # forget not run yet: no Ack
        await h.offload.run_next()
        assert waiter.done() and h.initiator.forgotten == ["r1"]
        while h.offload.pending:
            await h.offload.run_next()

    run(scenario)


def test_p_cancel_with_nothing_in_flight_is_acknowledged_at_once() -> None:
    async def scenario() -> None:
        h = PHarness()
        assert h.flow.handle(h.conn, CancelRequest(0, "unknown", "decode gave up")) is None

    run(scenario)


def test_p_aborts_every_transport_to_a_d_it_lost() -> None:
    async def scenario() -> None:
        h = PHarness()
        await h.flow.on_peer_lost("D7")
        assert h.initiator.aborted == [("D7", "control connection lost")]

    run(scenario)


class RecordingMetrics:
    def __init__(self) -> None:
        self.shipped: list[tuple[str, int, float | None, float]] = []

    def shipped_(self, protocol: str, num_blocks: int, *, transfer_s: float | None, exposed_s: float) -> None:
        self.shipped.append((protocol, num_blocks, transfer_s, exposed_s))


def test_p_passes_ready_tokens_and_measures_from_the_first_write() -> None:
    async def scenario() -> None:
        for pipelined in (True, False):
            h = PHarness(pipelined=pipelined)
            metrics = RecordingMetrics()
            h.flow.transfer_metrics = cast(TransferMetrics, type("M", (), {"shipped": metrics.shipped_})())
            await h.task()
            seq = FakeSeq("r1", block_table=[7, 8, 9])
            tokens: list[Any] = [object(), object()]
            h.layer(0, seq, 10, ready=tokens[0])
            h.layer(1, seq, 10, ready=tokens[1])
            h.initiator.verdict["r1"] = DONE
            h.worker.finish_prefill("r1", first_token_id=7, logprob=-0.5, top_logprobs=[(7, -0.5), (2, -1.0)])
            await settle()
            assert h.initiator.ready_tokens == tokens, pipelined  # deferred writes keep their token
            [(protocol, num_blocks, transfer_s, exposed_s)] = metrics.shipped
            assert protocol == "tcp" and num_blocks == 3
            assert transfer_s is not None and exposed_s >= 0
            # Pipelined: the first write precedes the end of the prefill; unpipelined: it follows it.
            assert transfer_s >= exposed_s if pipelined else transfer_s <= exposed_s
            [reply] = h.channel.sent
            assert isinstance(reply, PrefillResult)
            assert reply.top_token_ids == [7, 2] and reply.top_logprobs == [-0.5, -1.0]

    run(scenario)


def test_the_task_carries_api_sampling_fields_through_the_one_codec() -> None:
    """api's batched sampling fields (logit_bias pairs, allowed ids, ...) cross P<->D as the
    engine's SamplingParams dataclass, through the codec (no to_wire dict on this path)."""
    params = dataclasses.replace(
        PARAMS, logit_bias=((5, -1.5), (7, 2.0)), allowed_token_ids=(1, 2, 3), top_logprobs=2
    )
    task = PrefillTask(0, "r1", [1, 2], params, [3], "tcp", ENDPOINT)
    decoded = messages.decode(messages.encode(task))
    assert decoded == task and decoded.sampling_params == params
