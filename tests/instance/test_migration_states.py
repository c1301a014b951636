"""Live migration's two state machines, step by step, on fakes (no threads, no sleeps): the
source's pre-copy / pause / stop-and-copy / commit and every failure before the commit; the
target's reservation, admission and fencing. Block ids are exact."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from scheduler.messages import Assignment, NodeInfo, WorkItem, encode
from splitwise.codes import Mode, Protocol, Role
from splitwise.counters import Counters
from splitwise.engine.errors import OutOfBlocksError
from splitwise.engine.migration import BlockView, RunningState
from splitwise.engine.outputs import RequestOutput
from splitwise.engine.sampling_params import SamplingParams
from splitwise.instance.migration_source import MigrationSource, Serving
from splitwise.instance.migration_state import SourceState, TargetState, transfer_id
from splitwise.instance.migration_target import MigrationRefused, MigrationTarget
from splitwise.transfer.base import DONE, failed
from splitwise.transfer.errors import RemoteError
from splitwise.transfer.messages import Granted, MigrateAbort, MigrateCommit, MigrateOffer
from tests.instance.handoff_harness import (
    BLOCK_SIZE,
    FakeChannel,
    FakeConnection,
    FakeInitiator,
    FakeTarget,
    settle,
)

GEOMETRY = FakeTarget().endpoint().geometry


def run(test: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """Each test is one event loop, bounded (a hang fails instead of blocking the suite)."""

    @functools.wraps(test)
    def wrapper() -> None:
        asyncio.run(asyncio.wait_for(test(), 10))

    return wrapper


PROMPT = list(range(10, 23))  # 13 tokens
PARAMS = SamplingParams(temperature=0.8, seed=42, max_tokens=100)


def _info(node_id: str) -> NodeInfo:
    return NodeInfo(
        node_id=node_id,
        role=Role.DECODE,
        host="127.0.0.1",
        http_port=1,
        pd_comm_port=2,
        model_id="m",
        kv=GEOMETRY,
        transfer_protocols=[Protocol.TCP],
        transfer_endpoints={Protocol.TCP: FakeTarget().endpoint()},
        host_id="h",
    )


def _item() -> WorkItem:
    a = Assignment(
        Mode.DISAGG, "p0", "d1", Protocol.TCP, decode_incarnation="i1", bookings=["d|g|d1|i1|r|0|1"]
    )
    return WorkItem("r", PROMPT, PARAMS, "fe", 0, 10**13, 0, [], a)


class SourceWorker:
    """The source engine as data: ``num_outputs`` grows as the test 'decodes'."""

    block_size = BLOCK_SIZE

    def __init__(self) -> None:
        self.block_table = tuple(range(100, 110))
        self.num_outputs = 3  # 13 prompt + 3 outputs: 15 computed tokens, 3 full blocks
        self.preemptions = 0
        self.paused = False
        self.log: list[str] = []
        self.decoding = True

    @property
    def num_computed(self) -> int:
        return len(PROMPT) + self.num_outputs - 1

    def _view(self) -> BlockView:
        n = self.num_computed
        return BlockView(self.block_table, n, n // BLOCK_SIZE, self.preemptions)

    async def migration_blocks(self, req_id: str) -> BlockView | None:
        return self._view() if self.decoding else None

    async def pause_for_migration(self, req_id: str) -> RunningState | None:
        self.log.append("pause")
        if not self.decoding:
            return None
        self.paused = True
        outputs = [900 + i for i in range(self.num_outputs)]
        return RunningState("r", PROMPT, outputs, PARAMS, self.num_computed, self._view())

    async def resume_migration(self, req_id: str) -> None:
        self.log.append("resume")
        self.paused = False

    async def drop_migrated(self, req_id: str) -> None:
        self.log.append("drop")


class SourceNode:
    def __init__(self) -> None:
        self.info = _info("d1")
        self.log: list[str] = []

    async def decode_peers(self) -> list[Any]:
        return []

    async def flush(self) -> None:
        self.log.append("flush")

    def hand_off(self, item: WorkItem, *, to_node: str) -> None:
        self.log.append(f"hand_off:{to_node}")


class GrantingChannel(FakeChannel):
    def __init__(self, dst: list[int]) -> None:
        super().__init__()
        self.dst = dst

    async def call_for_grant(self, conn: Any, message: Any, timeout_s: float | None = None) -> Granted:
        await self.call(conn, message, timeout_s)
        return Granted(call_id=1, dst_block_ids=self.dst)


class LandingInitiator(FakeInitiator):
    """Every finished round lands, unless the test put a verdict for it."""

    def wait(self, req_id: str, timeout_s: float) -> Any:
        return self.verdict.get(req_id, DONE if req_id in self.finished else failed("never finished"))


async def _inline(fn: Any) -> Any:
    return fn()


def _source(worker: SourceWorker, channel: GrantingChannel, initiator: LandingInitiator) -> MigrationSource:
    return MigrationSource(
        worker,  # type: ignore[arg-type]
        channel,  # type: ignore[arg-type]
        {"tcp": initiator},
        SourceNode(),
        Counters(),
        num_layers=2,
        headroom_tokens=8,
        timeout_s=5.0,
        offload=_inline,
    )


def _serving(worker: SourceWorker) -> Serving:
    # 3 outputs published (indexes 0..2): the stream is up to date at the pause.
    return Serving(_item(), first_index=0, next_index=worker.num_outputs)


@run
async def test_happy_path_copies_full_blocks_first_then_the_rest_and_commits() -> None:
    worker, initiator = SourceWorker(), LandingInitiator()
    worker.num_outputs = 8  # 20 computed tokens: 5 full blocks -> pre-copy, then the rest
    channel = GrantingChannel(list(range(40, 48)))
    source = _source(worker, channel, initiator)
    outcome = await source.migrate(_serving(worker), _info("d2"), "tcp", why="manual")
    assert outcome.ok and outcome.num_rounds == 1 and outcome.num_blocks == 5
    round0 = transfer_id("r", 0)
    assert [w for w in initiator.writes if w[0] == round0] == [
        (round0, 0, [100, 101, 102, 103, 104], [40, 41, 42, 43, 44]),
        (round0, 1, [100, 101, 102, 103, 104], [40, 41, 42, 43, 44]),
    ]
    offer = channel.of_type(MigrateOffer)[0]
    assert offer.num_tokens == len(PROMPT) + 100 and offer.transfer_ids[0] == round0
    commit = channel.of_type(MigrateCommit)[0]
    assert commit.next_index == 8 and commit.num_computed_tokens == 20
    assert commit.output_token_ids == [900 + i for i in range(8)] and commit.sampling_params == PARAMS
    assert commit.transfer_ids == [round0]  # 20 tokens = 5 full blocks: nothing left for the stop
    assert worker.log == ["pause", "drop"]
    assert source.node.log == ["flush", "hand_off:d2"]  # type: ignore[attr-defined]


@run
async def test_partial_block_goes_in_the_final_round_while_paused() -> None:
    worker, initiator = SourceWorker(), LandingInitiator()
    worker.num_outputs = 10  # 22 computed: 5 full blocks + 2 tokens in block 5
    source = _source(worker, GrantingChannel(list(range(40, 48))), initiator)
    outcome = await source.migrate(_serving(worker), _info("d2"), "tcp", why="manual")
    assert outcome.ok and outcome.num_rounds == 2
    final = transfer_id("r", 1)
    assert [w[2:] for w in initiator.writes if w[0] == final] == [([105], [45]), ([105], [45])]


@run
async def test_refused_offer_fails_without_touching_the_request() -> None:
    worker, initiator = SourceWorker(), LandingInitiator()
    channel = GrantingChannel([])
    channel.refuse[MigrateOffer] = RemoteError("no room")
    source = _source(worker, channel, initiator)
    outcome = await source.migrate(_serving(worker), _info("d2"), "tcp", why="balance")
    assert not outcome.ok and "no room" in outcome.error
    assert worker.log == [] and not channel.of_type(MigrateAbort) and not initiator.writes


@run
async def test_final_round_not_landing_resumes_and_fences_before_the_target_releases() -> None:
    worker, initiator = SourceWorker(), LandingInitiator()
    worker.num_outputs = 10
    initiator.verdict[transfer_id("r", 1)] = failed("target died")
    channel = GrantingChannel(list(range(40, 48)))
    source = _source(worker, channel, initiator)
    outcome = await source.migrate(_serving(worker), _info("d2"), "tcp", why="manual")
    assert not outcome.ok and "target died" in outcome.error
    assert worker.log == ["pause", "resume"]  # decoding again here, nothing dropped
    assert not channel.of_type(MigrateCommit)
    # Every round was forgotten (fenced) before D2 was told it may release.
    assert initiator.forgotten.count(transfer_id("r", 1)) >= 1 and channel.of_type(MigrateAbort)
    assert source.node.log == []  # type: ignore[attr-defined]


@run
async def test_refused_commit_resumes_here() -> None:
    worker, initiator = SourceWorker(), LandingInitiator()
    channel = GrantingChannel(list(range(40, 48)))
    channel.refuse[MigrateCommit] = RemoteError("could not admit")
    source = _source(worker, channel, initiator)
    outcome = await source.migrate(_serving(worker), _info("d2"), "tcp", why="manual")
    assert not outcome.ok and worker.log == ["pause", "resume"]
    assert source.node.log == ["flush"]  # type: ignore[attr-defined]
    assert source.transitions.counters.get("migration_commit_unknown") == 0


@run
async def test_cancel_during_the_offer_never_commits() -> None:
    worker, initiator = SourceWorker(), LandingInitiator()
    channel = GrantingChannel(list(range(40, 48)))
    channel.gates.hold("MigrateOffer")
    source = _source(worker, channel, initiator)
    task = asyncio.ensure_future(source.migrate(_serving(worker), _info("d2"), "tcp", why="manual"))
    await settle()
    assert source.records["r"].state is SourceState.OFFERING
    source.cancel("r")
    await channel.gates.open("MigrateOffer")
    outcome = await task
    assert not outcome.ok and not channel.of_type(MigrateCommit) and channel.of_type(MigrateAbort)


# -- target side ------------------------------------------------------------------------------


class TargetWorker:
    def __init__(self, num_free: int = 16) -> None:
        self.free = list(range(num_free))
        self.reservations: dict[str, list[int]] = {}
        self.admitted: list[RunningState] = []

    def is_attached(self, req_id: str) -> bool:
        return False

    async def reserve(self, req_id: str, num_tokens: int) -> list[int]:
        n = -(-num_tokens // BLOCK_SIZE)
        if n > len(self.free):
            raise OutOfBlocksError("full", req_id=req_id)
        self.reservations[req_id], self.free = self.free[:n], self.free[n:]
        return list(self.reservations[req_id])

    async def release_reservation(self, req_id: str) -> None:
        self.free.extend(self.reservations.pop(req_id, []))

    async def admit_migrated(self, state: RunningState) -> asyncio.Queue[RequestOutput]:
        self.admitted.append(state)
        return asyncio.Queue()


def _target(worker: TargetWorker, target: FakeTarget, adopted: list[tuple[Any, ...]]) -> MigrationTarget:
    return MigrationTarget(
        worker,  # type: ignore[arg-type]
        {"tcp": target},
        Counters(),
        adopt=lambda *args: adopted.append(args),
        timeout_s=5.0,
        offload=_inline,
    )


def _offer() -> MigrateOffer:
    return MigrateOffer(1, "r", 20, Protocol.TCP, [transfer_id("r", 0), transfer_id("r", 1)])


def _commit(ids: list[str]) -> MigrateCommit:
    return MigrateCommit(2, "r", encode(_item()), PROMPT, [900, 901, 902, 903], PARAMS, 16, 9, ids)


@run
async def test_target_reserves_expects_every_round_and_admits_on_commit() -> None:
    worker, transport, adopted = TargetWorker(), FakeTarget(), []
    mt = _target(worker, transport, adopted)
    conn = FakeConnection("d1")
    granted = await mt.handle(conn, _offer())  # type: ignore[misc]
    assert granted.dst_block_ids == [0, 1, 2, 3, 4]
    assert transport.expected == {transfer_id("r", 0): [0, 1, 2, 3, 4], transfer_id("r", 1): [0, 1, 2, 3, 4]}
    transport.land(transfer_id("r", 0))
    await mt.handle(conn, _commit([transfer_id("r", 0)]))  # type: ignore[misc]
    assert worker.admitted[0].output_token_ids == [900, 901, 902, 903]
    assert worker.admitted[0].num_computed_tokens == 16
    (item, first_index, next_index, _queue, from_node) = adopted[0]
    assert (item.req_id, first_index, next_index, from_node) == ("r", 5, 9, "d1")
    assert "r" not in mt.records and "r" in worker.reservations  # adopted by the engine, not released


@run
async def test_target_refuses_a_commit_whose_rounds_did_not_land_and_releases() -> None:
    worker, transport, adopted = TargetWorker(), FakeTarget(), []
    mt = _target(worker, transport, adopted)
    conn = FakeConnection("d1")
    await mt.handle(conn, _offer())  # type: ignore[misc]
    with pytest.raises(MigrationRefused):
        await mt.handle(conn, _commit([transfer_id("r", 0)]))  # type: ignore[misc]
    assert not adopted and "r" not in worker.reservations and len(worker.free) == 16


@run
async def test_target_fences_a_lost_source_before_releasing() -> None:
    worker, transport, adopted = TargetWorker(), FakeTarget(), []
    mt = _target(worker, transport, adopted)
    await mt.handle(FakeConnection("d1"), _offer())  # type: ignore[misc]
    mt.on_peer_lost("d1")
    assert mt.records["r"].state is TargetState.FENCING
    await settle()
    assert transport.revoked == ["d1"] and "r" not in worker.reservations and "r" not in mt.records


@run
async def test_target_quarantines_when_the_revoke_is_not_confirmed() -> None:
    worker, transport, adopted = TargetWorker(), FakeTarget(), []
    transport.revoke_confirms = False
    mt = _target(worker, transport, adopted)
    await mt.handle(FakeConnection("d1"), _offer())  # type: ignore[misc]
    mt.on_peer_lost("d1")
    await settle()
    assert "r" in worker.reservations  # kept for good: a write may still land
    assert mt.counters.get("reservations_quarantined") == 1


@run
async def test_target_refuses_an_offer_it_has_no_room_for() -> None:
    worker, transport, adopted = TargetWorker(num_free=2), FakeTarget(), []
    mt = _target(worker, transport, adopted)
    with pytest.raises(MigrationRefused):
        await mt.handle(FakeConnection("d1"), _offer())  # type: ignore[misc]
    assert not transport.expected and not mt.records
