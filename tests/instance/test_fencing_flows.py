"""The flow ends of fenced cancels (#11), with fakes for the channel, worker and transports:
D releases a reservation only after P's acknowledgement, else after a confirmed revoke, else
never (quarantine); P aborts its transport to a D whose control connection dropped."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from splitwise.errors import SplitwiseError
from splitwise.instance.decode_flow import DecodeFlow
from splitwise.instance.prefill_flow import PrefillFlow
from splitwise.transfer.base import TransferCounters


class FakeWorker:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.engine = self  # PrefillFlow reads engine.config.block_size and sets the callback
        self.config = type("C", (), {"block_size": 4})()

    def set_layer_callback(self, callback: Any) -> None:
        self.callback = callback

    async def call(self, fn: Any) -> Any:
        return fn(self)

    def release_reservation(self, req_id: str) -> None:
        self.log.append(f"release {req_id}")


class FakeChannel:
    def __init__(self, log: list[str], *, acks: bool) -> None:
        self.log, self.acks = log, acks

    async def call(self, conn: Any, message: Any) -> None:
        self.log.append(f"cancel {message.req_id}")
        if not self.acks:
            raise SplitwiseError("no answer in time")


class FakeConn:
    is_closed = False

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def close(self, reason: str) -> None:
        self.log.append("close control")


class FakeTarget:
    def __init__(self, log: list[str], *, fenced: bool) -> None:
        self.log, self.fenced = log, fenced

    def revoke(self, peer_id: str) -> bool:
        self.log.append(f"revoke {peer_id}")
        return self.fenced


async def retire(acks: bool, fenced: bool) -> tuple[list[str], TransferCounters]:
    log: list[str] = []
    counters = TransferCounters()
    flow = DecodeFlow(None, FakeWorker(log), FakeChannel(log, acks=acks), {}, counters)  # type: ignore[arg-type]
    flow._retire_reservation("r", FakeConn(log), FakeTarget(log, fenced=fenced), "p1")  # type: ignore[arg-type]
    await asyncio.gather(*flow._background)
    return log, counters


def test_d_releases_after_the_acknowledgement_without_revoking() -> None:
    log, _ = asyncio.run(retire(acks=True, fenced=True))
    assert log == ["cancel r", "release r"]


def test_d_revokes_an_unanswering_p_before_releasing() -> None:
    log, _ = asyncio.run(retire(acks=False, fenced=True))
    assert log == ["cancel r", "close control", "revoke p1", "release r"]


def test_d_quarantines_the_blocks_when_the_revoke_cannot_be_confirmed() -> None:
    log, counters = asyncio.run(retire(acks=False, fenced=False))
    assert log == ["cancel r", "close control", "revoke p1"]  # never released
    assert counters.get("reservations_quarantined") == 1


class FakeInitiator:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def abort_peer(self, peer_id: str, reason: str) -> None:
        self.log.append(f"abort {peer_id}: {reason}")


@pytest.mark.parametrize("protocols", [("rdma",), ("ipc", "tcp")])
def test_p_aborts_every_transport_to_a_d_it_lost(protocols: tuple[str, ...]) -> None:
    log: list[str] = []
    initiators = {p: FakeInitiator(log) for p in protocols}
    flow = PrefillFlow(FakeWorker(log), None, initiators, TransferCounters())  # type: ignore[arg-type]
    asyncio.run(flow.on_peer_lost("d7"))
    assert log == ["abort d7: control connection lost"] * len(protocols)
