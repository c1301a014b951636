"""Target side of a live migration (D2 serves D1; states in ``migration_state``).

    MigrateOffer  -> reserve KV for the request's length + headroom, the target expects every copy
                     round's transfer id -> Granted(block ids)      (or refuse: the request stays)
    MigrateCommit -> every round D1 used is DONE -> admit into the engine with the output history
                     -> the runtime adopts the work item (``Migrated`` to the frontend) and streams
    MigrateAbort  -> D1 fenced its writes: release the reservation

Fencing (as the P/D hand-off, #11): the reservation goes back only once D1 can no longer write into
it. D1's MigrateAbort comes after its initiator's ``forget`` returned, and D1 sends the commit only
after every round landed; without either (D1's control connection dropped, or no commit within
``timeout_s``) the target ``revoke``s D1's access first and releases once it confirms; unconfirmed,
the blocks stay reserved for good (QUARANTINED, ``reservations_quarantined``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable

from scheduler.messages import WorkItem
from scheduler.messages import decode as decode_scheduler
from splitwise.counters import Counters
from splitwise.engine.errors import EngineError, OutOfBlocksError
from splitwise.engine.migration import BlockView, RunningState
from splitwise.engine.outputs import RequestOutput
from splitwise.instance.engine_worker import EngineWorker
from splitwise.instance.handoff_state import Transitions
from splitwise.instance.migration_state import TARGET_MOVES, TargetRecord, TargetState
from splitwise.instance.offload import Offload, run_in_executor
from splitwise.instance.pd_channel import Connection
from splitwise.logging import get_logger
from splitwise.transfer.base import TransportTarget
from splitwise.transfer.messages import CallMessage, Granted, MigrateAbort, MigrateCommit, MigrateOffer

log = get_logger(__name__)
T = TargetState

MIGRATION_MESSAGES = (MigrateOffer, MigrateCommit, MigrateAbort)
# (item as sent by D1, first engine output's index, next index, outputs, from node): the runtime
# adopts the request and streams it.
Adopt = Callable[[WorkItem, int, int, asyncio.Queue[RequestOutput], str], None]


class MigrationRefused(EngineError):
    """This node cannot take the request (no blocks, no transport, already here, bad commit)."""

    retryable = True


class MigrationTarget:
    def __init__(
        self,
        worker: EngineWorker,
        targets: dict[str, TransportTarget],
        counters: Counters,
        *,
        adopt: Adopt,
        timeout_s: float,
        offload: Offload = run_in_executor,
    ) -> None:
        self.worker = worker
        self.targets = targets
        self.counters = counters
        self.adopt = adopt
        self.timeout_s = timeout_s
        self._offload = offload
        self.transitions = Transitions("migration-target", TARGET_MOVES, counters)
        self.records: dict[str, TargetRecord] = {}
        self._background: set[asyncio.Task[None]] = set()

    def handle(self, conn: Connection, message: CallMessage) -> Awaitable[Granted | None] | None:
        """A migration call from D1 (on the loop, before the reply). Raise to refuse."""
        if isinstance(message, MigrateOffer):
            return self._offer(conn, message)
        rec = self.records.get(message.req_id)
        if rec is None or rec.peer_id != conn.peer_id or not rec.is_in(T.RESERVED):
            raise MigrationRefused("no migration of this request is reserved here", req_id=message.req_id)
        if isinstance(message, MigrateCommit):
            return self._commit(rec, message)
        if isinstance(message, MigrateAbort):
            return self._release(rec, T.RELEASED, "aborted", message.reason)
        return None

    async def settled(self, req_id: str) -> None:
        """Until no migration reservation of ``req_id`` is left here (bounded by the fence). A
        re-dispatch of a request whose source died mid-copy may reach this node first: its own
        reservation under the same id must wait for the migration's to be released."""
        rec = self.records.get(req_id)
        if rec is not None:
            await asyncio.wait_for(rec.ended.wait(), self.timeout_s + 10)

    def on_peer_lost(self, peer_id: str) -> None:
        for rec in list(self.records.values()):
            if rec.peer_id == peer_id and rec.is_in(T.RESERVED):
                self._fence_later(rec, "peer_lost", f"lost the control connection to {peer_id}")

    # -- the calls ----------------------------------------------------------------------------

    async def _offer(self, conn: Connection, offer: MigrateOffer) -> Granted:
        req_id = offer.req_id
        target = self.targets.get(offer.protocol)
        if target is None:
            raise MigrationRefused(f"this decode node offers no {offer.protocol!r} transport", req_id=req_id)
        if req_id in self.records or self.worker.is_attached(req_id):
            raise MigrationRefused("this request is already here", req_id=req_id)
        try:
            block_ids = await self.worker.reserve(req_id, offer.num_tokens)
        except OutOfBlocksError as exc:
            raise MigrationRefused(f"no room: {exc}", req_id=req_id) from None
        rec = TargetRecord(req_id, T.RESERVED, peer_id=conn.peer_id, protocol=offer.protocol)
        rec.dst_block_ids, rec.transfer_ids = list(block_ids), list(offer.transfer_ids)
        self.records[req_id] = rec
        for tid in rec.transfer_ids:
            target.expect(tid, rec.dst_block_ids, timeout_s=self.timeout_s)
        rec.timer = asyncio.get_running_loop().create_task(
            self._time_out(rec), name=f"migration-timeout-{req_id}"
        )
        self.counters.inc("migrations_reserved")
        return Granted(call_id=0, dst_block_ids=rec.dst_block_ids)

    async def _commit(self, rec: TargetRecord, commit: MigrateCommit) -> None:
        target = self.targets[rec.protocol]
        missing = [tid for tid in commit.transfer_ids if not target.poll(tid).is_done]
        if missing or not set(commit.transfer_ids) <= set(rec.transfer_ids):
            # D1 waited for every round to land before committing: it writes nothing more.
            await self._release(rec, T.RELEASED, "refused", f"copy rounds not landed: {missing}")
            raise MigrationRefused(f"copy rounds not landed here: {missing}", req_id=rec.req_id)
        item: WorkItem = decode_scheduler(commit.work_item, WorkItem)
        state = RunningState(
            req_id=rec.req_id,
            prompt_token_ids=list(commit.prompt_token_ids),
            output_token_ids=list(commit.output_token_ids),
            params=commit.sampling_params,
            num_computed_tokens=commit.num_computed_tokens,
            blocks=BlockView(tuple(rec.dst_block_ids), commit.num_computed_tokens, 0, 0),
        )
        await self._forget_all(rec)
        try:
            outputs = await self.worker.admit_migrated(state)
        except EngineError as exc:
            await self._release(rec, T.RELEASED, "refused", str(exc))
            raise MigrationRefused(f"could not admit the request: {exc}", req_id=rec.req_id) from None
        self._end(rec, T.ADMITTED, "committed")
        first_index = commit.next_index - len(commit.output_token_ids)
        self.adopt(item, first_index, commit.next_index, outputs, rec.peer_id)
        self.counters.inc("migrations_admitted")

    # -- fencing and release ------------------------------------------------------------------

    async def _time_out(self, rec: TargetRecord) -> None:
        await asyncio.sleep(self.timeout_s)
        if rec.is_in(T.RESERVED):
            self._fence_later(rec, "timeout", f"no commit within {self.timeout_s}s")

    def _fence_later(self, rec: TargetRecord, event: str, reason: str) -> None:
        self.transitions.move(rec, T.FENCING, event, reason)
        task = asyncio.get_running_loop().create_task(self._fence(rec), name=f"migration-fence-{rec.req_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fence(self, rec: TargetRecord) -> None:
        """D1 did not say it stopped writing: cut its access first, then release."""
        await self._forget_all(rec)
        target = self.targets[rec.protocol]
        if await self._offload(functools.partial(target.revoke, rec.peer_id)):
            await self._release(rec, T.RELEASED, "revoked")
            return
        self.counters.inc("reservations_quarantined")
        log.error("could not fence the migration source; KV blocks stay reserved", peer=rec.peer_id)
        self._end(rec, T.QUARANTINED, "unfenced", "revoke not confirmed")

    async def _release(self, rec: TargetRecord, end: TargetState, event: str, reason: str = "") -> None:
        await self._forget_all(rec)
        try:
            await self.worker.release_reservation(rec.req_id)
        finally:
            self._end(rec, end, event, reason)
            self.counters.inc("migrations_released")
            log.info(
                "migration reservation released", req_id=rec.req_id, migration_event=event, reason=reason
            )

    async def _forget_all(self, rec: TargetRecord) -> None:
        target = self.targets[rec.protocol]
        for tid in rec.transfer_ids:
            await self._offload(functools.partial(target.forget, tid))

    def _end(self, rec: TargetRecord, end: TargetState, event: str, reason: str = "") -> None:
        if rec.timer is not None and rec.timer is not asyncio.current_task():
            rec.timer.cancel()
        if self.transitions.can_move(rec, end):
            self.transitions.move(rec, end, event, reason)
        if self.records.get(rec.req_id) is rec and not self.transitions.moves[rec.state]:
            del self.records[rec.req_id]
            rec.ended.set()

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
