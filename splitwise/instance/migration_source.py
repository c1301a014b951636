"""Source side of a live migration (D1 drives; states in ``migration_state``, docs/architecture.md).

    offer (D2 reserves + expects, answers Granted) -> connect D1's initiator to D2's target
    -> pre-copy rounds: the blocks that are full now and not sent yet, while D1 keeps decoding
       (each round its own transfer id, so D1 knows it landed before the next starts)
    -> pause in D1's engine (between two steps) -> final round: blocks filled since + the partial one
    -> every token D1 produced is in Redis (outbox flush) -> MigrateCommit (tokens, params, work item)
    -> D2 admitted it: D1's node agent hands the item off (booking released, no terminal), blocks freed

Before the commit every failure leaves the request on D1: it is resumed if it was paused, D1's
writes are fenced (the initiator's ``forget`` returns only when none can still land) and only then
is D2 told to release its reservation (MigrateAbort). A commit whose answer is lost (timeout, the
connection dropped) is treated as refused and the request resumes on D1: if D2 did admit it, both
produce the same tokens (same KV, same sampler state) and the frontend's index de-duplication
drops the second copy; the first terminal ends the request (counted as ``migration_commit_unknown``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from scheduler.clock import SYSTEM_CLOCK, Clock
from scheduler.dispatch import choose_protocol
from scheduler.messages import NodeInfo, WorkItem
from scheduler.messages import encode as encode_scheduler
from scheduler.migration import Peer, pick_target
from splitwise import codes
from splitwise.counters import Counters
from splitwise.engine.errors import EngineError
from splitwise.engine.migration import BlockView
from splitwise.errors import SplitwiseError
from splitwise.instance.engine_worker import EngineWorker
from splitwise.instance.handoff_state import Transitions
from splitwise.instance.migration_state import (
    SOURCE_MOVES,
    MigrationOutcome,
    SourceRecord,
    SourceState,
    transfer_id,
)
from splitwise.instance.offload import Offload, run_in_executor
from splitwise.instance.pd_channel import Connection, PDChannel
from splitwise.logging import get_logger
from splitwise.transfer.base import TransportInitiator
from splitwise.transfer.errors import RemoteError
from splitwise.transfer.messages import MigrateAbort, MigrateCommit, MigrateOffer

log = get_logger(__name__)
S = SourceState

MAX_PRECOPY_ROUNDS = 3  # then stop and copy whatever is left
# The target reserves the request's length now plus this (or the headroom flag, if larger), capped at
# the most the request can ever hold: it keeps decoding here while the pre-copy runs, and whatever it
# reserved becomes the request's block table there (no block is wasted beyond its final length).
GROWTH_MARGIN_TOKENS = 256
STOP_BELOW_BLOCKS = 2  # a round that would copy fewer new full blocks than this goes straight to the stop


class MigrationError(EngineError):
    """A migration could not go ahead (the request stays where it is)."""

    retryable = True


@dataclass
class Serving:
    """The runtime's view of one request it streams (NodeRuntime creates it; the loop owns it)."""

    item: WorkItem
    first_index: int  # completion index of this engine's first output for the request
    next_index: int  # completion index of the next token this node publishes
    migrated_to: str = ""  # set at the commit: the stream then ends without a terminal
    done: bool = False
    advanced: asyncio.Event = field(default_factory=asyncio.Event)

    def published(self, next_index: int) -> None:
        self.next_index = next_index
        self.advanced.set()

    async def wait_published(self, index: int) -> None:
        """Until every token before ``index`` was handed to the node agent (or the stream ended)."""
        while self.next_index < index and not self.done:
            self.advanced.clear()
            await self.advanced.wait()


class SourceNode(Protocol):
    """What the source needs of the node agent (``NodeAgent``)."""

    @property
    def info(self) -> NodeInfo: ...
    async def decode_peers(self) -> list[Peer]: ...
    async def flush(self) -> None: ...
    def hand_off(self, item: WorkItem, *, to_node: str) -> None: ...


class MigrationSource:
    def __init__(
        self,
        worker: EngineWorker,
        channel: PDChannel,
        initiators: dict[str, TransportInitiator],
        node: SourceNode,
        counters: Counters,
        *,
        num_layers: int,
        headroom_tokens: int,
        timeout_s: float,
        on_outcome: Callable[[MigrationOutcome], None] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        offload: Offload = run_in_executor,
    ) -> None:
        self.worker = worker
        self.channel = channel
        self.initiators = initiators
        self.node = node
        self.counters = counters
        self.num_layers = num_layers
        self.headroom_tokens = headroom_tokens
        self.timeout_s = timeout_s
        self.on_outcome = on_outcome
        self.clock = clock
        self._offload = offload
        self.transitions = Transitions("migration-source", SOURCE_MOVES, counters)
        self.records: dict[str, SourceRecord] = {}

    def cancel(self, req_id: str) -> None:
        """The frontend cancelled ``req_id``: a migration under way must not commit it."""
        rec = self.records.get(req_id)
        if rec is not None:
            rec.cancelled = True

    async def migrate_to(self, serving: Serving, target: str | None, *, why: str) -> MigrationOutcome:
        """Migrate to ``target`` (a node id), or to the live compatible decode node with the most
        free KV blocks. Never raises for a migration that cannot happen: the outcome says why."""
        me = self.node.info
        try:
            peer = pick_target(me, await self.node.decode_peers(), target)
        except SplitwiseError as exc:
            peer, error = None, f"cannot read the registry: {exc}"
        else:
            error = f"{target or 'no node'} is not a live decode node of this model and KV geometry"
        protocol = choose_protocol(me, peer.info) if peer is not None else None
        if peer is None or protocol is None or protocol not in self.initiators:
            if peer is not None:
                error = f"no transfer protocol in common with {peer.info.node_id}"
            self.counters.inc("migrations_failed")
            outcome = MigrationOutcome(serving.item.req_id, False, me.node_id, target or "", why, error)
            if self.on_outcome is not None:
                self.on_outcome(outcome)
            return outcome
        return await self.migrate(serving, peer.info, protocol, why=why)

    async def migrate(
        self, serving: Serving, target: NodeInfo, protocol: str, *, why: str
    ) -> MigrationOutcome:
        req_id = serving.item.req_id
        if req_id in self.records:
            raise MigrationError("a migration of this request is already under way", req_id=req_id)
        rec = SourceRecord(req_id, S.OFFERING, peer_id=target.node_id, target_id=target.node_id, why=why)
        rec.protocol = protocol
        self.records[req_id] = rec
        self.counters.inc("migrations_started")
        started_s = self.clock.monotonic()
        pause_s = 0.0
        try:
            pause_s = await self._drive(rec, serving, target)
        except (SplitwiseError, asyncio.TimeoutError, OSError) as exc:
            await self._abort(rec, serving, str(exc) or type(exc).__name__)
        finally:
            del self.records[req_id]
            rec.ended.set()
        ok = rec.is_in(S.COMMITTED)
        self.counters.inc("migrations_completed" if ok else "migrations_failed")
        outcome = MigrationOutcome(
            req_id=req_id,
            ok=ok,
            source=self.node.info.node_id,
            target=target.node_id,
            reason=why,
            error="" if ok else rec.reason,
            pause_ms=round(pause_s * 1000, 3),
            num_blocks=rec.num_blocks,
            num_rounds=len(rec.transfer_ids),
        )
        log.info(
            "migration ended" if ok else "migration failed; the request stays here",
            req_id=req_id,
            target=target.node_id,
            why=why,
            error=outcome.error,
            pause_ms=outcome.pause_ms,
            blocks=rec.num_blocks,
            rounds=outcome.num_rounds,
            ms=round((self.clock.monotonic() - started_s) * 1000, 1),
        )
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        return outcome

    # -- the steps ----------------------------------------------------------------------------

    async def _drive(self, rec: SourceRecord, serving: Serving, target: NodeInfo) -> float:
        req_id = rec.req_id
        initiator = self.initiators.get(rec.protocol)
        endpoint = target.transfer_endpoints.get(codes.Protocol(rec.protocol))
        if initiator is None or endpoint is None:
            raise MigrationError(f"no {rec.protocol} transport between this node and {target.node_id}")
        view = await self._decoding(rec)
        conn = rec.conn = await self.channel.connection_to(target.node_id, target.host, target.pd_comm_port)
        offer = MigrateOffer(
            call_id=0,
            req_id=req_id,
            num_tokens=self._reservation_tokens(serving, view),
            protocol=codes.Protocol(rec.protocol),
            transfer_ids=[transfer_id(req_id, k) for k in range(MAX_PRECOPY_ROUNDS + 1)],
        )
        try:
            granted = await self.channel.call_for_grant(conn, offer, self.timeout_s)
        except SplitwiseError as exc:
            self.transitions.move(rec, S.FAILED, "refused", f"target refused: {exc}")
            raise
        rec.dst_block_ids = list(granted.dst_block_ids)
        self.transitions.move(rec, S.PRECOPYING, "granted")
        await self._offload(functools.partial(initiator.connect, target.node_id, endpoint))
        copied, preemptions = 0, view.num_preemptions
        for _ in range(MAX_PRECOPY_ROUNDS):
            view = await self._decoding(rec)
            if view.num_preemptions != preemptions:  # its blocks were dropped and recomputed
                copied, preemptions = 0, view.num_preemptions
            num_full = min(view.num_full_blocks, len(rec.dst_block_ids))
            if num_full - copied < STOP_BELOW_BLOCKS:
                break
            await self._copy_round(rec, initiator, view.block_ids, copied, num_full)
            copied = num_full
        return await self._stop_and_commit(rec, serving, conn, initiator, copied, preemptions)

    def _reservation_tokens(self, serving: Serving, view: BlockView) -> int:
        item = serving.item
        most = len(item.prompt_token_ids) + item.sampling_params.max_tokens
        margin = max(self.headroom_tokens, GROWTH_MARGIN_TOKENS)
        return max(view.num_computed_tokens + 1, min(most, view.num_computed_tokens + margin))

    async def _decoding(self, rec: SourceRecord) -> BlockView:
        view = await self.worker.migration_blocks(rec.req_id)
        if view is None or rec.cancelled:
            raise MigrationError("the request is not decoding here (finished, cancelled or preempted)")
        return view

    async def _stop_and_commit(
        self,
        rec: SourceRecord,
        serving: Serving,
        conn: Connection,
        initiator: TransportInitiator,
        copied: int,
        preemptions: int,
    ) -> float:
        state = await self.worker.pause_for_migration(rec.req_id)
        if state is None:
            raise MigrationError("the request is not decoding here (finished, cancelled or preempted)")
        paused_s = self.clock.monotonic()
        rec.paused = True
        self.transitions.move(rec, S.STOPPING, "paused")
        if state.blocks.num_preemptions != preemptions:
            copied = 0
        end = -(-state.num_computed_tokens // self.worker.block_size)
        if end > len(rec.dst_block_ids):
            raise MigrationError(
                f"the request grew past the {len(rec.dst_block_ids)} blocks reserved on the target"
            )
        await self._copy_round(rec, initiator, state.blocks.block_ids, copied, end)
        # Every output of the steps before the pause is on its way to the stream: wait until all
        # of them were published.
        next_index = serving.first_index + len(state.output_token_ids)
        await serving.wait_published(next_index)
        await self.node.flush()  # D1's last tokens are in Redis before D2 publishes any
        if rec.cancelled or serving.done:
            raise MigrationError("the request was cancelled during the migration")
        self.transitions.move(rec, S.COMMITTING, "landed")
        commit = MigrateCommit(
            call_id=0,
            req_id=rec.req_id,
            work_item=encode_scheduler(serving.item),
            prompt_token_ids=state.prompt_token_ids,
            output_token_ids=state.output_token_ids,
            sampling_params=state.params,
            num_computed_tokens=state.num_computed_tokens,
            next_index=next_index,
            transfer_ids=list(rec.transfer_ids),
        )
        try:
            await self.channel.call(conn, commit, self.timeout_s)
        except RemoteError:
            raise  # D2 refused: it released its reservation itself
        except SplitwiseError:
            self.counters.inc("migration_commit_unknown")
            raise
        serving.migrated_to = rec.target_id
        self.node.hand_off(serving.item, to_node=rec.target_id)
        self.transitions.move(rec, S.COMMITTED, "committed")
        await self.worker.drop_migrated(rec.req_id)  # the stream ends; the runtime acks without a terminal
        return self.clock.monotonic() - paused_s

    async def _copy_round(
        self,
        rec: SourceRecord,
        initiator: TransportInitiator,
        block_ids: tuple[int, ...],
        start: int,
        end: int,
    ) -> None:
        """Copy blocks ``start .. end-1`` of the block table (every layer, K and V) into the same
        positions of the target's reservation, as one transfer, and wait until it landed."""
        if end <= start:
            return
        tid = transfer_id(rec.req_id, len(rec.transfer_ids))
        rec.transfer_ids.append(tid)
        src, dst = list(block_ids[start:end]), rec.dst_block_ids[start:end]
        for layer in range(self.num_layers):
            initiator.write_layer(rec.target_id, tid, layer, src, dst, None)  # full/paused: valid now
        initiator.finish(rec.target_id, tid)
        rec.num_blocks += end - start
        status = await self._offload(lambda: initiator.wait(tid, self.timeout_s))
        await self._offload(functools.partial(initiator.forget, tid))
        if not status.is_done:
            raise MigrationError(f"KV copy round {tid} {status.state.value}: {status.reason or 'timed out'}")

    async def _abort(self, rec: SourceRecord, serving: Serving, reason: str) -> None:
        """Before the commit: D1 keeps the request. Fence our writes, then let D2 release."""
        if rec.is_in(S.FAILED):
            return  # refused at the offer: D2 reserved nothing
        self.transitions.move(rec, S.ABORTING, "failure", reason)
        if rec.paused and not serving.done:
            try:
                await self.worker.resume_migration(rec.req_id)
            except SplitwiseError as exc:  # cancelled meanwhile: the engine abort ended it
                log.info("paused request was not resumed", req_id=rec.req_id, error=str(exc))
        initiator = self.initiators.get(rec.protocol)
        if initiator is not None:
            for tid in rec.transfer_ids:
                await self._offload(functools.partial(initiator.forget, tid))
        try:
            if rec.conn is None:
                raise MigrationError("never connected to the target")
            await self.channel.call(rec.conn, MigrateAbort(call_id=0, req_id=rec.req_id, reason=reason))
        except SplitwiseError as exc:  # D2 fences and releases on its own (lost peer or timeout)
            log.info("target not told to release; it times the reservation out", error=str(exc))
        self.transitions.move(rec, S.FAILED, "fenced")
