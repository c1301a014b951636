"""The frontend's dispatch step (a mixin of ``FrontendScheduler``, kept apart for size): pick and
book a pair and enqueue the work item in one script call per candidate group, then record the
hand-off; when the script could not enqueue (a description missing, a lost stream), enqueue here.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from scheduler.clock import Clock
from scheduler.config import SchedulerConfig
from scheduler.connection import stream_id
from scheduler.dispatch import UNASSIGNED, Dispatcher, Picked, booking_members
from scheduler.errors import NoCapacityError
from scheduler.frontend_monitor import Monitor
from scheduler.frontend_record import FrontendRecord
from scheduler.keys import KeySchema
from scheduler.lease import ServerClock
from scheduler.messages import Assignment, KVGeometry, encode
from scheduler.metrics import Counters
from scheduler.prefix_index import group_prefix_hashes
from scheduler.registry import ClusterView, split_member
from scheduler.states import FrontendState
from splitwise.logging import get_logger

log = get_logger("scheduler.frontend")


class FrontendDispatch:
    config: SchedulerConfig
    keys: KeySchema
    stats: Counters
    kv: KVGeometry | None
    frontend_id: str
    server_clock: ServerClock
    lost_work_streams: dict[str, tuple[int, int]]
    _clock: Clock
    _client: aioredis.Redis | None
    _dispatcher: Dispatcher | None
    _view: ClusterView | None
    _monitor: Monitor | None
    _inflight: dict[str, FrontendRecord]

    async def dispatch(self, fl: FrontendRecord) -> None:
        """Pick + book a pair and hand the WorkItem to the (decode or mixed) node's work stream, in
        one script call (the node builds the Assignment from the entry; we build it from our view)."""
        assert self._dispatcher is not None and self._view is not None and self._client is not None
        assert self._monitor is not None
        now = self.server_clock.now_ms()
        prompt_tokens = len(fl.request.prompt_token_ids) + len(fl.delivered)
        payload = encode(fl.work_item(self.frontend_id, UNASSIGNED))
        for refresh in (False, True):
            if refresh:
                await self._monitor.refresh_view()  # a node may have just joined
            for group in self._view.candidate_groups(fl.model_id, self.kv, now):
                block_size, hashes = group_prefix_hashes(fl.tokens, group)
                picked = await self._dispatcher.pick(
                    fl.req_id,
                    group,
                    prompt_tokens=prompt_tokens,
                    attempt=fl.attempt,
                    now_ms=now,
                    expire_at_ms=fl.deadline_ms,
                    prefix_hashes=hashes,
                    block_size=block_size,
                    work_payload=payload,
                )
                if picked is None:
                    continue
                nodes = group.nodes
                if any(split_member(m)[0] not in nodes for m in picked.members[1:]):
                    await self._monitor.refresh_view()  # booked a node that registered after our last look
                    nodes = {n: s.info for n, s in self._view.nodes.items()}
                try:
                    assignment = self._dispatcher.assignment(
                        fl.req_id, group, picked, attempt=fl.attempt, nodes=nodes
                    )
                except NoCapacityError:
                    members = booking_members(
                        fl.req_id,
                        group.group,
                        picked.members,
                        prompt_tokens=picked.booked,
                        attempt=fl.attempt,
                    )
                    if picked.entry_id is not None:  # the node drops it too (it finds no protocol either)
                        work_key = self.keys.work(split_member(picked.decode_member)[0])
                        await self._client.xdel(work_key, picked.entry_id)
                    await self._dispatcher.release(members)
                    raise
                hits = picked.hits
                kv = f" kv_blocks={hits[0]}/{hits[1]}/{len(hashes)}" if hits and hashes else ""
                if await self._enqueue(fl, assignment, picked, kv=kv):
                    return
        raise NoCapacityError(
            f"no live prefill/decode pair or mixed node serves model {fl.model_id!r}", req_id=fl.req_id
        )

    async def _enqueue(
        self, fl: FrontendRecord, assignment: Assignment, picked: Picked, *, kv: str = ""
    ) -> bool:
        """Record the hand-off (the script enqueued the work entry; when it could not, we do).
        ``kv``: the cached prefix blocks of P / D / hashed, for the record (KV-aware routing)."""
        assert self._client is not None and self._dispatcher is not None
        work_key = self.keys.work(assignment.decode_node_id)
        if picked.created_id is not None:
            # The node's lease was live a moment ago (dispatch checked it), so only its stream was
            # lost (deleted by hand, or repaired as poison): the script gave it an empty one.
            self._note_lost_stream(assignment.decode_node_id, fl.req_id, picked.created_id)
        entry_id = picked.entry_id
        if entry_id is None:  # a description was missing in {t}:nodes: enqueue the full item here
            item = fl.work_item(self.frontend_id, assignment)
            entry_id = await self._xadd_work(work_key, encode(item))
            if entry_id is None:
                pipe = self._client.pipeline(transaction=False)
                pipe.xadd(work_key, {"created": self._clock.time_ms()}, maxlen=0)
                pipe.pexpire(work_key, self.config.ttl_ms)
                created_id, _ = await pipe.execute()
                self._note_lost_stream(assignment.decode_node_id, fl.req_id, created_id)
                entry_id = await self._xadd_work(work_key, encode(item))
        if entry_id is None:
            await self._dispatcher.release(list(assignment.bookings))
            return False
        local = picked.mode.partition("/")[2]
        mode = f"local({local})" if local else assignment.mode
        if local:
            self.stats.inc(f"dispatched_local_{local}")
        fl.note(
            self._clock.time_ms(),
            "dispatched",
            self.frontend_id,
            f"{mode} p={assignment.prefill_node_id} d={assignment.decode_node_id} "
            f"protocol={assignment.protocol} attempt={fl.attempt}{kv}",
        )
        fl.assignment, fl.entry_id, fl.pending_since_ms = assignment, entry_id, None
        if self._inflight.get(fl.req_id) is fl and fl.is_live:
            fl.move(FrontendState.QUEUED, self.stats, why="dispatched")
        # else: its results came back (and ended it) while we awaited the script's reply
        return True

    def _note_lost_stream(self, node_id: str, req_id: str, created_id: bytes) -> None:
        """Items queued before ``created_id`` were lost with the stream: the monitor re-dispatches them."""
        self.stats.inc("work_stream_missing")
        log.warning("work_stream_recreated", node_id=node_id, req_id=req_id)
        self.lost_work_streams[node_id] = stream_id(created_id)

    async def _xadd_work(self, work_key: str, payload: bytes) -> bytes | None:
        assert self._client is not None
        entry_id: Any = await self._client.xadd(
            work_key, {"m": payload}, maxlen=self.config.stream_maxlen, approximate=True, nomkstream=True
        )
        return entry_id  # type: ignore[no-any-return]
