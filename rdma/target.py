"""D's side of the rdma transport (TransportTarget).

    accept thread    TCP side channel: Hello -> one QP per initiator lane (to RTS) -> HelloReply
    reader threads   one per initiator: notices the connection closing (P gone -> its QPs retired)
    poller thread    polls every lane's receive CQ: each WRITE_WITH_IMM(tag) counts one lane done;
                     when all lanes of that initiator delivered ``tag``, the request is DONE and
                     D sends RequestResult back to P. A receive completion error fails the
                     requests that initiator had started and retires its QPs.

The KV buffer is registered once per NIC with REMOTE_WRITE; P writes straight into the blocks.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rdma import messages
from rdma.connection import QPPolicy, RcConnection
from rdma.errors import RdmaError
from rdma.gpu_memory import CudaDriver
from rdma.lane import Backoff
from rdma.messages import Hello, HelloReply, RequestResult, TargetLane
from rdma.resources import GpuPolicy, NicResources, choose_nics, default_backend, open_nics
from rdma.verbs import Access, QPCaps, VerbsBackend
from splitwise.engine.kv_cache import KVCache
from splitwise.transfer.base import (
    DONE,
    PENDING,
    Endpoint,
    TransferCounters,
    TransferStatus,
    TransportOptions,
    TransportTarget,
    check_block_ids,
    check_compatible,
    failed,
    geometry_from_dict,
    geometry_to_dict,
)
from splitwise.transfer.errors import NotRegisteredError, TransferError

RECV_DEPTH = 64


@dataclass
class _Expected:
    req_id: str
    tag: int
    deadline: float | None
    status: TransferStatus = PENDING


@dataclass
class _Initiator:
    """One connected P: its socket and the QPs (lanes) it writes through."""

    name: str
    sock: socket.socket
    lanes: list[RcConnection]
    notices: dict[int, int] = field(default_factory=dict)  # tag -> lanes that delivered it
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    qp_lock: threading.Lock = field(default_factory=threading.Lock)  # polling vs. destroying the QPs
    broken: bool = False


class RdmaTarget(TransportTarget):
    protocol = "rdma"

    def __init__(
        self,
        options: TransportOptions,
        *,
        backend: VerbsBackend | None = None,
        nics: Sequence[str] | None = None,
        policy: QPPolicy | None = None,
        backoff: Backoff | None = None,
        cuda_driver: CudaDriver | None = None,
    ) -> None:
        self.options = options
        self.counters = TransferCounters()
        self._backend = backend
        self._gpu_policy = GpuPolicy.from_options(options, cuda_driver)
        self._nic_names = list(nics) if nics else None
        self._policy = policy or QPPolicy()
        self._backoff = backoff or Backoff(max_s=0.0005)
        self._lock = threading.Lock()
        self._nics: list[NicResources] = []
        self._kv_cache: KVCache | None = None
        self._expected: dict[str, _Expected] = {}
        self._by_tag: dict[int, str] = {}
        self._initiators: list[_Initiator] = []
        self._recv_ids = itertools.count(1)
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ TransportTarget

    def register(self, kv_cache: KVCache) -> None:
        backend = self._backend or default_backend(self.options)
        names = self._nic_names or choose_nics(kv_cache, self.options)
        self._nics = open_nics(
            backend,
            names,
            kv_cache,
            Access.LOCAL_WRITE | Access.REMOTE_WRITE,
            gpu=self._gpu_policy,
            counters=self.counters,
        )
        self._kv_cache = kv_cache
        listener = socket.create_server((self.options.host, self.options.port))
        listener.settimeout(0.2)
        self._listener = listener
        for target in (self._accept_loop, self._poll_loop):
            thread = threading.Thread(target=target, name=f"rdma-target-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def endpoint(self) -> Endpoint:
        if self._kv_cache is None or self._listener is None:
            raise NotRegisteredError("rdma target: endpoint() before register()")
        return Endpoint(
            protocol="rdma",
            host=self.options.host,
            port=int(self._listener.getsockname()[1]),
            geometry=self._kv_cache.geometry,
            schema=messages.SCHEMA_VERSION,
        )

    def expect(self, req_id: str, dst_block_ids: Sequence[int], timeout_s: float | None = None) -> None:
        if self._kv_cache is None:
            raise NotRegisteredError("rdma target: expect() before register()", req_id=req_id)
        check_block_ids(dst_block_ids, self._kv_cache.geometry.num_blocks, side="destination", req_id=req_id)
        tag = messages.request_tag(req_id)
        with self._lock:
            if req_id in self._expected:
                raise TransferError("request already expected", req_id=req_id)
            if tag in self._by_tag:
                raise TransferError(f"request tag {tag:#x} collides with {self._by_tag[tag]}", req_id=req_id)
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            self._expected[req_id] = _Expected(req_id, tag, deadline)
            self._by_tag[tag] = req_id

    def poll(self, req_id: str) -> TransferStatus:
        with self._lock:
            entry = self._expected.get(req_id)
            if entry is None:
                return failed(f"rdma target: unknown request {req_id}")
            if entry.status is PENDING and entry.deadline is not None and time.monotonic() > entry.deadline:
                entry.status = failed("rdma target: timed out waiting for the initiator's writes")
                self.counters.inc("transfers_timed_out")
            return entry.status

    def forget(self, req_id: str) -> None:
        with self._lock:
            entry = self._expected.pop(req_id, None)
            if entry is not None:
                self._by_tag.pop(entry.tag, None)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)
        with self._lock:
            for entry in self._expected.values():
                if entry.status is PENDING:
                    entry.status = failed("rdma target closed")
            initiators, self._initiators = self._initiators, []
        for initiator in initiators:
            self._retire(initiator)
        if self._listener is not None:
            self._listener.close()
        for nic in self._nics:
            nic.close()
        self._nics = []

    # ------------------------------------------------------------------ side channel

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(
                target=self._serve, args=(sock, f"{address[0]}:{address[1]}"), daemon=True
            ).start()

    def _serve(self, sock: socket.socket, name: str) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            initiator = self._handshake(sock, name)
        except (RdmaError, TransferError, OSError, ConnectionError) as exc:
            self.counters.inc("handshakes_refused")
            try:
                messages.send_message(sock, HelloReply(False, str(exc), {}, []))
            except OSError:
                pass
            sock.close()
            return
        try:
            while sock.recv(1):  # P sends nothing more; EOF means it is gone
                pass
        except OSError:
            pass
        with self._lock:
            if initiator in self._initiators:
                self._initiators.remove(initiator)
        with initiator.qp_lock:  # the poller updates ``notices`` under this lock
            self._fail_started(initiator, "rdma target: initiator connection closed")
        self._retire(initiator)

    def _handshake(self, sock: socket.socket, name: str) -> _Initiator:
        assert self._kv_cache is not None
        sock.settimeout(self.options.connect_timeout_s)
        hello = messages.recv_message(sock)
        if not isinstance(hello, Hello) or not hello.lanes:
            raise RdmaError("expected a Hello with at least one lane", peer=name)
        check_compatible(self._kv_cache.geometry, geometry_from_dict(hello.geometry), peer=hello.initiator_id)
        lanes: list[RcConnection] = []
        replies: list[TargetLane] = []
        try:
            for index, peer_end in enumerate(hello.lanes):
                nic = self._nics[index % len(self._nics)]
                conn = RcConnection(
                    nic.device,
                    nic.port,
                    caps=QPCaps(max_send_wr=4, max_recv_wr=RECV_DEPTH),
                    policy=self._policy,
                )
                lanes.append(conn)
                conn.qp.post_recv([next(self._recv_ids) for _ in range(RECV_DEPTH)])
                local_end = conn.local_endpoint()
                conn.connect(peer_end)
                # kv_addr is in the MR's address space: the VA, or the IOVA of a dma-buf MR.
                replies.append(
                    TargetLane(
                        local_end,
                        nic.kv_addr,
                        self._kv_cache.geometry.total_bytes,
                        nic.kv.rkey,
                        nic.doorbell.addr,
                        nic.doorbell.rkey,
                    )
                )
        except Exception:
            for conn in lanes:
                conn.close()
            raise
        initiator = _Initiator(hello.initiator_id or name, sock, lanes)
        with self._lock:
            self._initiators.append(initiator)
        messages.send_message(sock, HelloReply(True, "", geometry_to_dict(self._kv_cache.geometry), replies))
        sock.settimeout(None)
        self.counters.inc("initiators_connected")
        return initiator

    # ------------------------------------------------------------------ completions

    def _poll_loop(self) -> None:
        delay = self._backoff.delays()
        while not self._stop.is_set():
            with self._lock:
                initiators = list(self._initiators)
            busy = sum(self._poll_initiator(initiator) for initiator in initiators)
            if busy:
                delay = self._backoff.delays()
            else:
                time.sleep(delay())

    def _poll_initiator(self, initiator: _Initiator) -> int:
        with initiator.qp_lock:
            return self._poll_lanes(initiator)

    def _poll_lanes(self, initiator: _Initiator) -> int:
        seen = 0
        for conn in initiator.lanes:
            if initiator.broken:
                return seen
            completions = conn.qp.poll_recv(RECV_DEPTH)
            seen += len(completions)
            for completion in completions:
                if not completion.ok or completion.imm_data is None:
                    initiator.broken = True
                    self._fail_started(initiator, f"rdma target: receive completion {completion.status.name}")
                    break
                conn.qp.post_recv([next(self._recv_ids)])
                self._count_notice(initiator, completion.imm_data)
        return seen

    def _count_notice(self, initiator: _Initiator, tag: int) -> None:
        count = initiator.notices.get(tag, 0) + 1
        if count < len(initiator.lanes):
            initiator.notices[tag] = count
            return
        initiator.notices.pop(tag, None)
        with self._lock:
            req_id = self._by_tag.get(tag)
            entry = self._expected.get(req_id) if req_id is not None else None
            if entry is None or entry.status is not PENDING:
                self.counters.inc("notices_unexpected")
                return
            entry.status = DONE
        self.counters.inc("transfers_done")
        self._reply(initiator, RequestResult(entry.req_id, True, ""))

    def _fail_started(self, initiator: _Initiator, reason: str) -> None:
        """Fail the requests this initiator had started (some lanes delivered, not all)."""
        with self._lock:
            for tag in list(initiator.notices):
                req_id = self._by_tag.get(tag)
                entry = self._expected.get(req_id) if req_id is not None else None
                if entry is not None and entry.status is PENDING:
                    entry.status = failed(reason)
            initiator.notices.clear()

    def _reply(self, initiator: _Initiator, message: RequestResult) -> None:
        try:
            with initiator.send_lock:
                messages.send_message(initiator.sock, message)
        except OSError:
            initiator.broken = True

    def _retire(self, initiator: _Initiator) -> None:
        with initiator.qp_lock:
            initiator.broken = True
            for conn in initiator.lanes:
                conn.close()
            initiator.lanes = []
        try:
            initiator.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread; close() alone does not
        except OSError:
            pass
        initiator.sock.close()
