"""D's side of the rdma transport (TransportTarget).

    accept thread    TCP side channel: cluster-token challenge (splitwise.transfer.auth) -> Hello
                     -> one QP per initiator lane (to RTS) -> HelloReply (the rkeys: only now)
    reader threads   one per initiator: RequestBegin -> RequestGrant; EOF = P gone (QPs retired)
    poller thread    polls every lane's receive CQ: each WRITE_WITH_IMM(tag) counts one lane done;
                     when all lanes of that initiator delivered ``tag``, the request is DONE and
                     D sends RequestResult back to P. A receive completion error fails the
                     requests bound to that initiator and retires its QPs.

Request bookkeeping is ``splitwise.transfer.tracking.TargetRequests`` (injected clock): a request
is bound to the initiator connection D granted it to, so losing or revoking that initiator fails
it. ``revoke(peer_id)`` moves that initiator's QPs to ERROR: from then on nothing it posted lands.

Access model: the KV buffer is registered once per NIC with REMOTE_WRITE (docs/rdma.md says why
not per request); the rkey is revealed only to an initiator that proved the cluster token.
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
from rdma.errors import InvalidConnectionInfoError, RdmaError
from rdma.gpu_memory import CudaDriver
from rdma.lane import Backoff
from rdma.messages import Hello, HelloReply, RequestBegin, RequestGrant, RequestResult, TargetLane
from rdma.side import AUTH_DOMAIN, RdmaSide
from rdma.verbs import Access, QPCaps, VerbsBackend
from splitwise.codes import Protocol
from splitwise.engine.kv_cache import KVCache
from splitwise.logging import get_logger
from splitwise.transfer import auth
from splitwise.transfer.base import (
    Endpoint,
    TransferStatus,
    TransportOptions,
    TransportTarget,
    check_block_ids,
    check_compatible,
)
from splitwise.transfer.errors import NotRegisteredError, TransferError, UnexpectedBlocksError
from splitwise.transfer.messages import Compatibility
from splitwise.transfer.tracking import AnyClock, TargetRequests

log = get_logger("rdma")

RECV_DEPTH = 64


@dataclass
class _Initiator:
    """One connected P: its socket and the QPs (lanes) it writes through."""

    conn_id: int
    name: str  # the authenticated client id (P's node id)
    sock: socket.socket
    lanes: list[RcConnection]
    notices: dict[int, int] = field(default_factory=dict)  # tag -> lanes that delivered it
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    qp_lock: threading.Lock = field(default_factory=threading.Lock)  # polling vs. destroying the QPs
    broken: bool = False


class RdmaTarget(RdmaSide, TransportTarget):
    def __init__(
        self,
        options: TransportOptions,
        *,
        backend: VerbsBackend | None = None,
        nics: Sequence[str] | None = None,
        policy: QPPolicy | None = None,
        backoff: Backoff | None = None,
        cuda_driver: CudaDriver | None = None,
        clock: AnyClock = time.monotonic,
    ) -> None:
        super().__init__(options, backend=backend, nics=nics, policy=policy, cuda_driver=cuda_driver)
        self._backoff = backoff or Backoff(max_s=0.0005)
        self._requests = TargetRequests(self.protocol, self.counters, clock)
        self._lock = threading.Lock()
        self._by_tag: dict[int, str] = {}
        self._initiators: list[_Initiator] = []
        self._conn_ids = itertools.count(1)
        self._recv_ids = itertools.count(1)
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ TransportTarget

    def register(self, kv_cache: KVCache) -> None:
        self.register_nics(kv_cache, Access.LOCAL_WRITE | Access.REMOTE_WRITE)
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
            protocol=Protocol.RDMA,
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
            if tag in self._by_tag and self._by_tag[tag] != req_id:
                raise TransferError(f"request tag {tag:#x} collides with {self._by_tag[tag]}", req_id=req_id)
            self._requests.expect(req_id, dst_block_ids, timeout_s)
            self._by_tag[tag] = req_id

    def poll(self, req_id: str) -> TransferStatus:
        return self._requests.poll(req_id)

    def forget(self, req_id: str) -> None:
        """Later grants and notices for ``req_id`` are refused. A WRITE already posted with a grant
        may still land: the flow releases the blocks only after P's acknowledgement or ``revoke``."""
        with self._lock:
            self._requests.forget(req_id)
            tag = messages.request_tag(req_id)
            if self._by_tag.get(tag) == req_id:
                del self._by_tag[tag]

    def revoke(self, peer_id: str) -> bool:
        """Move every QP of initiator ``peer_id`` to ERROR (a responder in ERROR places no more
        WRITEs), fail its requests, and drop it. Always confirmable on RC: returns True."""
        with self._lock:
            victims = [i for i in self._initiators if i.name == peer_id]
            self._initiators = [i for i in self._initiators if i.name != peer_id]
        for initiator in victims:
            with initiator.qp_lock:
                initiator.broken = True
                for conn in initiator.lanes:
                    conn.qp.to_error()
            self._requests.connection_lost(initiator.conn_id, f"access of {peer_id} revoked")
            self._retire(initiator)
        self.counters.inc("revokes")
        log.warning("rdma: revoked an initiator's access", peer=peer_id, num_connections=len(victims))
        return True

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)
        self._requests.fail_all("rdma target closed")
        with self._lock:
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

    def _serve(self, sock: socket.socket, address: str) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            initiator = self._handshake(sock, address)
        except (TransferError, OSError, ConnectionError) as exc:
            # Bad token, garbage, an oversize length prefix, a slow client: refused and closed;
            # the target keeps serving everyone else.
            self.counters.inc("handshakes_refused")
            log.warning("rdma side channel refused", peer=address, reason=str(exc))
            sock.close()
            return
        reason = "initiator connection closed"
        try:
            while not initiator.broken:
                message = messages.recv_message(sock)
                if not isinstance(message, RequestBegin):
                    raise InvalidConnectionInfoError(f"unexpected {message.TAG} from an initiator")
                self._grant(initiator, message.req_id)
        except (OSError, ConnectionError, RdmaError) as exc:
            reason = f"initiator connection closed: {exc}"
        with self._lock:
            if initiator in self._initiators:
                self._initiators.remove(initiator)
        self._requests.connection_lost(initiator.conn_id, reason)
        self._retire(initiator)

    def _handshake(self, sock: socket.socket, address: str) -> _Initiator:
        assert self._kv_cache is not None
        timeout_s = self.options.connect_timeout_s
        deadline = time.monotonic() + timeout_s  # for the whole handshake, not per read
        client_id = auth.serve_challenge(
            sock,
            token=self._token,
            server_id=self.options.node_id,
            domain=AUTH_DOMAIN,
            timeout_s=timeout_s,
            compat=Compatibility("", self._kv_cache.geometry),  # the hello below checks the geometry
        )
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        hello = messages.recv_message(sock)
        if not isinstance(hello, Hello) or not hello.lanes:
            raise RdmaError("expected a Hello with at least one lane", peer=address)
        if len(hello.lanes) > 4 * len(self._nics) + 8:
            raise RdmaError(f"{len(hello.lanes)} lanes asked: too many", peer=address)
        # P remaps heads when the replicas differ (tensor parallelism): D receives its own layout.
        check_compatible(self._kv_cache.geometry, hello.geometry, peer=client_id, head_remap=True)
        lanes, replies = self._open_lanes(hello)
        initiator = _Initiator(next(self._conn_ids), client_id or address, sock, lanes)
        try:
            messages.send_message(sock, HelloReply(True, "", self._kv_cache.geometry, replies))
        except OSError:
            for conn in lanes:
                conn.close()
            raise
        with self._lock:
            self._initiators.append(initiator)
        sock.settimeout(None)
        self.counters.inc("initiators_connected")
        return initiator

    def _open_lanes(self, hello: Hello) -> tuple[list[RcConnection], list[TargetLane]]:
        assert self._kv_cache is not None
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
        return lanes, replies

    def _grant(self, initiator: _Initiator, req_id: str) -> None:
        try:
            allowed = self._requests.admit(req_id, initiator.conn_id)
        except UnexpectedBlocksError as exc:
            self.counters.inc("grants_refused")
            self._reply(initiator, RequestGrant(req_id, False, str(exc), []))
            return
        self._reply(initiator, RequestGrant(req_id, True, "", sorted(allowed)))

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
                    reason = f"rdma target: receive completion {completion.status.name}"
                    self._requests.connection_lost(initiator.conn_id, reason)
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
        if req_id is None:
            self.counters.inc("notices_unexpected")
            return
        # One-sided writes cannot be counted here; the notice is ordered after every WRITE of
        # every lane (RC order), so it is trusted like ipc's finish notice.
        status = self._requests.finish(req_id, initiator.conn_id, 0, count_writes=False)
        self._reply(initiator, RequestResult(req_id, status.is_done, status.reason or ""))

    def _reply(self, initiator: _Initiator, message: RequestResult | RequestGrant) -> None:
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
