"""A lane: one connected RC QP on one NIC, with the keys to both ends of the transfer.

The initiator stripes a request's WRITEs over its lanes (one per NIC). A lane posts planned work
requests in batches that fit the free send-queue slots (waiting for completions when they do not),
and turns any completion error into CompletionError: the QP is then in ERROR and the lane is dead
until the connection is re-created. A failed WRITE is never reported as success.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rdma.connection import RcConnection
from rdma.errors import CompletionError, CompletionTimeoutError
from rdma.messages import TargetLane
from rdma.plan import WriteOp, batches, to_work_requests
from rdma.verbs import Completion, MemoryRegion, WorkRequest

NOTICE_BYTES = 8  # the WRITE_WITH_IMM that ends a request rewrites D's doorbell slot


@dataclass(frozen=True)
class Backoff:
    """Sleep schedule while waiting on a completion queue: spin briefly, then back off."""

    min_s: float = 0.0
    max_s: float = 0.001
    factor: float = 2.0

    def delays(self) -> Callable[[], float]:
        current = self.min_s

        def next_delay() -> float:
            nonlocal current
            delay = current
            current = min(self.max_s, max(current * self.factor, 1e-5))
            return delay

        return next_delay


class Lane:
    """Not thread-safe: the initiator's per-peer worker thread is its only user."""

    def __init__(
        self,
        conn: RcConnection,
        local_kv: MemoryRegion,
        local_doorbell: MemoryRegion,
        remote: TargetLane,
        *,
        local_kv_addr: int,
        peer: str,
        completion_timeout_s: float = 30.0,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.conn = conn
        self.local_kv = local_kv
        self.local_kv_addr = local_kv_addr  # the KV's first byte in local_kv's space (VA, or dma-buf IOVA)
        self.local_doorbell = local_doorbell
        self.remote = remote
        self.peer = peer
        self.completion_timeout_s = completion_timeout_s
        self.backoff = backoff or Backoff()
        self._clock, self._sleep = clock, sleep
        self._wr_ids = itertools.count(1)
        self.num_wrs_posted = 0

    @property
    def max_batch(self) -> int:
        # Half the queue per chain keeps the NIC busy with one chain while we post the next.
        return max(1, self.conn.caps.max_send_wr // 2)

    def write(self, ops: Sequence[WriteOp], req_id: str) -> None:
        """Post ``ops`` (offsets from the KV base on both sides) in batches; one signaled per batch."""
        wrs = to_work_requests(
            ops,
            local_base=self.local_kv_addr,
            lkey=self.local_kv.lkey,
            remote_base=self.remote.kv_addr,
            rkey=self.remote.kv_rkey,
            first_wr_id=next(self._wr_ids),
        )
        if wrs:
            self._wr_ids = itertools.count(wrs[-1].wr_id + 1)
        for batch in batches(wrs, max_batch=self.max_batch):
            self._post(batch, req_id)

    def notify(self, tag: int, req_id: str) -> None:
        """Tell D this lane's part of the request has landed: RC executes WRs in order, so the
        immediate's completion at D implies every earlier WRITE on this QP is placed."""
        wr = WorkRequest(
            next(self._wr_ids),
            self.local_doorbell.addr,
            NOTICE_BYTES,
            self.local_doorbell.lkey,
            self.remote.doorbell_addr,
            self.remote.doorbell_rkey,
            signaled=True,
            imm_data=tag,
        )
        self._post([wr], req_id)

    def drain(self, req_id: str) -> None:
        """Wait until every posted WR has completed (successfully, or raise)."""
        deadline = self._clock() + self.completion_timeout_s
        delay = self.backoff.delays()
        while self.conn.qp.num_free_send_slots < self.conn.caps.max_send_wr:
            if not self._reap(req_id):
                self._wait(deadline, delay, req_id)

    def _post(self, batch: list[WorkRequest], req_id: str) -> None:
        deadline = self._clock() + self.completion_timeout_s
        delay = self.backoff.delays()
        while self.conn.qp.num_free_send_slots < len(batch):
            if not self._reap(req_id):
                self._wait(deadline, delay, req_id)
        self.conn.qp.post_send(batch)
        self.num_wrs_posted += len(batch)
        self._reap(req_id)

    def _reap(self, req_id: str) -> int:
        completions = self.conn.qp.poll_send(64)
        for completion in completions:
            self._check(completion, req_id)
        return len(completions)

    def _check(self, completion: Completion, req_id: str) -> None:
        if not completion.ok:
            raise CompletionError(
                f"RDMA WRITE completed with {completion.status.name} on QP {completion.qpn}",
                status=completion.status.name,
                wr_id=completion.wr_id,
                qpn=completion.qpn,
                req_id=req_id,
                peer=self.peer,
                device=self.conn.device.name,
            )

    def _wait(self, deadline: float, delay: Callable[[], float], req_id: str) -> None:
        if self._clock() > deadline:
            raise CompletionTimeoutError(
                f"no send completion within {self.completion_timeout_s}s on QP {self.conn.qp.qpn}",
                req_id=req_id,
                peer=self.peer,
                device=self.conn.device.name,
            )
        self._sleep(delay())
