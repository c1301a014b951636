"""P's side of the rdma transport (TransportInitiator).

Per connected peer: one lane (RC QP) per local NIC, a worker thread turning queued ``write_layer``/
``finish`` calls into posted WRITEs (in call order), and a reader thread for D's side-channel replies.

    write_layer  -> (worker) grant of the request from D (once) -> wait for the layer's ready
                 token -> coalesce_runs -> plan_layer (plan_layer_remapped: other head replicas)
                 -> stripe over lanes -> Lane.write
    finish       -> Lane.notify on every lane (WRITE_WITH_IMM, imm = request_tag) -> drain
    forget       -> queued jobs skipped; a fence job drains every lane: returns once every WRITE
                    posted before it completed (landed) or flushed: nothing more can land
    RequestResult(ok) from D -> DONE          anything else -> FAILED (never DONE)

Any completion error, timeout, lost side channel or ``abort_peer`` breaks the peer: its PENDING
requests fail, the worker drains what it posted and exits; ``connect`` then re-handshakes.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from rdma import messages
from rdma.connection import QPPolicy, RcConnection
from rdma.errors import RdmaError
from rdma.gpu_memory import CudaDriver
from rdma.lane import Lane
from rdma.messages import Hello, HelloReply, RequestBegin, RequestGrant, RequestResult
from rdma.plan import plan_layer, plan_layer_remapped, stripe
from rdma.side import AUTH_DOMAIN, RdmaSide
from rdma.verbs import Access, QPCaps, VerbsBackend
from splitwise.codes import Protocol
from splitwise.engine.kv_cache import KVCache, KVCacheGeometry
from splitwise.logging import get_logger
from splitwise.transfer import auth
from splitwise.transfer.base import (
    BlockRun,
    Endpoint,
    ReadyToken,
    TransferStatus,
    TransportInitiator,
    TransportOptions,
    check_block_ids,
    check_compatible,
    coalesce_runs,
    wait_ready,
)
from splitwise.transfer.errors import (
    ConnectionLostError,
    IncompatiblePeerError,
    NotConnectedError,
    NotRegisteredError,
    TransferError,
    TransferTimeoutError,
    UnexpectedBlocksError,
)
from splitwise.transfer.messages import Compatibility
from splitwise.transfer.stream_initiator import count_down
from splitwise.transfer.tracking import InitiatorRequests

log = get_logger("rdma")

SEND_QUEUE_DEPTH = 256


@dataclass
class _Job:
    kind: str  # "write" | "finish" | "fence"
    req_id: str
    layer: int = -1
    runs: list[BlockRun] = field(default_factory=list)
    ready: ReadyToken | None = None
    done: threading.Event = field(default_factory=threading.Event)  # fence: set once drained


@dataclass
class _Peer:
    peer_id: str
    sock: socket.socket
    lanes: list[Lane]
    geometry: KVCacheGeometry
    jobs: queue.Queue[_Job | None] = field(default_factory=queue.Queue)
    broken: str | None = None  # the reason, once broken
    worker: threading.Thread | None = None
    grants: dict[str, RequestGrant] = field(default_factory=dict)
    grant_arrived: threading.Condition = field(default_factory=threading.Condition)
    # Begins sent and not answered yet, per request; and how many answers to drop because the
    # request was forgotten meanwhile: a grant for a forgotten incarnation must never be used by a
    # later write_layer of the same req_id (it would post into blocks D has released).
    unanswered: dict[str, int] = field(default_factory=dict)
    stale: dict[str, int] = field(default_factory=dict)
    send_lock: threading.Lock = field(default_factory=threading.Lock)


class RdmaInitiator(RdmaSide, TransportInitiator):
    def __init__(
        self,
        options: TransportOptions,
        *,
        backend: VerbsBackend | None = None,
        nics: Sequence[str] | None = None,
        policy: QPPolicy | None = None,
        initiator_id: str | None = None,
        send_queue_depth: int = SEND_QUEUE_DEPTH,
        completion_timeout_s: float = 30.0,
        cuda_driver: CudaDriver | None = None,
    ) -> None:
        super().__init__(options, backend=backend, nics=nics, policy=policy, cuda_driver=cuda_driver)
        # D's revoke(peer_id) finds our QPs by this authenticated id: our node id.
        self._initiator_id = initiator_id or options.node_id or "prefill"
        self._caps = QPCaps(max_send_wr=send_queue_depth, max_recv_wr=1)
        self._completion_timeout_s = completion_timeout_s
        self._requests = InitiatorRequests(self.protocol, self.counters)
        self._lock = threading.Lock()
        self._peers: dict[str, _Peer] = {}
        self._closed = False

    # ------------------------------------------------------------------ set-up

    def register(self, kv_cache: KVCache) -> None:
        self.register_nics(kv_cache, Access.LOCAL_WRITE)

    def connect(self, peer_id: str, endpoint: Endpoint) -> None:
        if self._kv_cache is None:
            raise NotRegisteredError("rdma initiator: connect() before register()", peer=peer_id)
        with self._lock:
            old = self._peers.get(peer_id)
            if old is not None and old.broken is None:
                return
        if old is not None:
            self._retire(old)
        peer = self._handshake(peer_id, endpoint)
        with self._lock:
            self._peers[peer_id] = peer
        peer.worker = threading.Thread(
            target=self._work_loop, args=(peer,), name=f"rdma-work-{peer_id}", daemon=True
        )
        peer.worker.start()
        threading.Thread(
            target=self._read_loop, args=(peer,), name=f"rdma-read-{peer_id}", daemon=True
        ).start()

    def _handshake(self, peer_id: str, endpoint: Endpoint) -> _Peer:
        assert self._kv_cache is not None
        if endpoint.protocol != Protocol.RDMA or endpoint.schema != messages.SCHEMA_VERSION:
            raise IncompatiblePeerError(
                f"not an rdma endpoint of schema {messages.SCHEMA_VERSION}", peer=peer_id
            )
        # A different number of head replicas (tensor parallelism) is remapped here, at P.
        check_compatible(self._kv_cache.geometry, endpoint.geometry, peer=peer_id, head_remap=True)
        conns = [
            RcConnection(nic.device, nic.port, caps=self._caps, policy=self._policy) for nic in self._nics
        ]
        try:
            sock = socket.create_connection(
                (endpoint.host, endpoint.port), timeout=self.options.connect_timeout_s
            )
        except OSError as exc:
            for conn in conns:
                conn.close()
            raise ConnectionLostError(
                f"rdma side channel to {endpoint.host}:{endpoint.port}: {exc}", peer=peer_id
            ) from None
        try:
            reply = self._hello(sock, conns)
            for conn, lane in zip(conns, reply.lanes, strict=True):
                conn.connect(lane.qp)
            sock.settimeout(None)
        except (OSError, ConnectionError) as exc:
            sock.close()
            for conn in conns:
                conn.close()
            raise ConnectionLostError(f"rdma side channel: {exc}", peer=peer_id) from None
        except Exception:
            sock.close()
            for conn in conns:
                conn.close()
            raise
        lanes = [
            Lane(
                conn,
                nic.kv,
                nic.doorbell,
                remote,
                local_kv_addr=nic.kv_addr,
                peer=peer_id,
                completion_timeout_s=self._completion_timeout_s,
            )
            for conn, nic, remote in zip(conns, self._nics, reply.lanes, strict=True)
        ]
        self.counters.inc("peers_connected")
        return _Peer(peer_id, sock, lanes, reply.geometry)

    def _hello(self, sock: socket.socket, conns: list[RcConnection]) -> HelloReply:
        """The cluster-token challenge, then the QP exchange (D reveals its rkeys only after it)."""
        assert self._kv_cache is not None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        auth.answer_challenge(
            sock,
            token=self._token,
            client_id=self._initiator_id,
            domain=AUTH_DOMAIN,
            timeout_s=self.options.connect_timeout_s,
            compat=Compatibility("", self._kv_cache.geometry),  # the hello below checks the geometry
        )
        sock.settimeout(self.options.connect_timeout_s)
        hello = Hello(self._initiator_id, self._kv_cache.geometry, [c.local_endpoint() for c in conns])
        messages.send_message(sock, hello)
        reply = messages.recv_message(sock)
        if not isinstance(reply, HelloReply) or not reply.ok:
            reason = reply.reason if isinstance(reply, HelloReply) else "unexpected reply"
            raise IncompatiblePeerError(f"rdma target refused the connection: {reason}")
        if len(reply.lanes) != len(conns):
            raise IncompatiblePeerError(f"{len(reply.lanes)} lanes offered for {len(conns)} asked")
        return reply

    # ------------------------------------------------------------------ per request

    def write_layer(
        self,
        peer_id: str,
        req_id: str,
        layer: int,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
        ready: ReadyToken | None = None,
    ) -> None:
        if self._kv_cache is None:
            raise NotRegisteredError("rdma initiator: write_layer() before register()", req_id=req_id)
        peer = self._peer(peer_id, req_id)
        check_block_ids(src_block_ids, self._kv_cache.geometry.num_blocks, side="source", req_id=req_id)
        check_block_ids(dst_block_ids, peer.geometry.num_blocks, side="destination", req_id=req_id)
        if not 0 <= layer < self._kv_cache.geometry.num_layers:
            raise TransferError(f"layer {layer} out of range", req_id=req_id, peer=peer_id)
        runs = coalesce_runs(src_block_ids, dst_block_ids)
        self._requests.start(req_id, peer_id)
        peer.jobs.put(_Job("write", req_id, layer, runs, ready))

    def finish(self, peer_id: str, req_id: str) -> None:
        peer = self._peer(peer_id, req_id)
        self._requests.start(req_id, peer_id)
        peer.jobs.put(_Job("finish", req_id))

    def poll(self, req_id: str) -> TransferStatus:
        return self._requests.poll(req_id)

    def wait(self, req_id: str, timeout_s: float) -> TransferStatus:
        return self._requests.wait(req_id, timeout_s)

    def forget(self, req_id: str) -> None:
        """Stop posting for ``req_id`` and return once none of its WRITEs can still land: a fence
        job, queued behind everything already accepted, drains every lane (each posted WRITE
        completed, i.e. placed at D, or flushed). Raises TransferTimeoutError when the drain does
        not finish in time; the peer is then broken, so D must revoke rather than trust an ack."""
        self._requests.forget(req_id)
        with self._lock:
            peers = list(self._peers.values())
        for peer in peers:
            with peer.grant_arrived:
                peer.grants.pop(req_id, None)
                if peer.unanswered.get(req_id):
                    peer.stale[req_id] = peer.unanswered[req_id]
            if peer.worker is threading.current_thread():
                continue  # the worker itself: it drains before it takes the next job
            fence = _Job("fence", req_id)
            peer.jobs.put(fence)
            if not self._wait_fence(peer, fence):
                self.counters.inc("forget_wait_timeouts")
                self._break(peer, f"forget({req_id}): posted WRITEs did not drain in time")
                raise TransferTimeoutError(
                    "posted RDMA WRITEs did not drain in time", req_id=req_id, peer=peer.peer_id
                )

    def abort_peer(self, peer_id: str, reason: str) -> None:
        """P's control connection to ``peer_id`` dropped: stop posting, fail its requests, and
        return once the worker drained what it had posted (or gave up past the timeout)."""
        with self._lock:
            peer = self._peers.get(peer_id)
        if peer is None:
            return
        self.counters.inc("peers_aborted")
        self._break(peer, f"aborted: {reason}")
        if peer.worker is not None and peer.worker is not threading.current_thread():
            peer.worker.join(timeout=self._completion_timeout_s + 1)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            self._break(peer, "rdma initiator closed")
            self._retire(peer)
        self._requests.fail_all("rdma initiator closed")
        for nic in self._nics:
            nic.close()
        self._nics = []

    # ------------------------------------------------------------------ threads

    def _work_loop(self, peer: _Peer) -> None:
        try:
            while True:
                job = peer.jobs.get()
                if job is None or peer.broken is not None:
                    if job is not None:
                        job.done.set()
                    return
                if job.kind == "fence":
                    self._drain(peer, job.req_id)
                    job.done.set()
                elif self._requests.is_pending(job.req_id):  # else forgotten/failed: skip it
                    self._run(peer, job)
        except RdmaError as exc:
            self.counters.inc("completion_errors")
            self._break(peer, f"rdma: {exc}")
        except TransferError as exc:  # the side channel failed (grant request)
            self._break(peer, f"rdma side channel: {exc}")
        finally:
            self._drain_quietly(peer)
            self._release_waiters(peer)

    def _run(self, peer: _Peer, job: _Job) -> None:
        req_id = job.req_id
        if job.kind == "finish":
            tag = messages.request_tag(req_id)
            for lane in peer.lanes:
                lane.notify(tag, req_id)
            for lane in peer.lanes:
                lane.drain(req_id)
            return
        if not self._await_grant(peer, job):
            return
        if not wait_ready(job.ready, is_cancelled=lambda: self._is_cancelled(peer, req_id)):
            return  # forgotten or broken while the producer was still writing: nothing read
        max_msg_bytes = min(lane.conn.port.max_msg_bytes for lane in peer.lanes)
        assert self._kv_cache is not None  # write_layer checked it before queueing the job
        local = self._kv_cache.geometry
        if local.needs_head_remap(peer.geometry):
            ops = plan_layer_remapped(local, peer.geometry, job.layer, job.runs, max_msg_bytes=max_msg_bytes)
        else:
            ops = plan_layer(
                peer.geometry, job.layer, job.runs, local_base=0, remote_base=0, max_msg_bytes=max_msg_bytes
            )
        for lane, lane_ops in zip(peer.lanes, stripe(ops, len(peer.lanes)), strict=True):
            lane.write(lane_ops, req_id)
        self.counters.inc("layers_posted")

    def _is_cancelled(self, peer: _Peer, req_id: str) -> bool:
        return peer.broken is not None or not self._requests.is_pending(req_id)

    def _await_grant(self, peer: _Peer, job: _Job) -> bool:
        """Worker thread: D's grant of the request (asked once per request): P posts nothing for
        a request D does not expect any more, and nothing outside the blocks D reserved."""
        req_id = job.req_id
        with peer.grant_arrived:
            grant = peer.grants.get(req_id)
        if grant is None:
            try:
                with peer.grant_arrived:
                    peer.unanswered[req_id] = peer.unanswered.get(req_id, 0) + 1
                with peer.send_lock:
                    messages.send_message(peer.sock, RequestBegin(req_id))
            except OSError as exc:
                raise ConnectionLostError(f"rdma side channel: {exc}", peer=peer.peer_id) from None
            deadline = time.monotonic() + self.options.connect_timeout_s
            with peer.grant_arrived:
                while req_id not in peer.grants and not self._is_cancelled(peer, req_id):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._requests.resolve(req_id, False, "no grant from the rdma target")
                        return False
                    peer.grant_arrived.wait(min(left, 0.05))
                grant = peer.grants.get(req_id)
        if grant is None:
            return False
        if not grant.ok:
            self._requests.resolve(req_id, False, f"rdma target refused the request: {grant.reason}")
            return False
        allowed = set(grant.dst_block_ids)
        stray = sorted({r.dst_start + i for r in job.runs for i in range(r.num_blocks)} - allowed)
        if stray:
            error = UnexpectedBlocksError(
                "write to blocks not reserved for the request", req_id=req_id, block_ids=stray
            )
            self._requests.resolve(req_id, False, str(error))
            return False
        return True

    def _drain(self, peer: _Peer, req_id: str) -> None:
        for lane in peer.lanes:
            lane.drain(req_id)

    def _drain_quietly(self, peer: _Peer) -> None:
        """The worker is leaving: wait until what it posted completed or flushed (bounded)."""
        for lane in peer.lanes:
            try:
                lane.drain("")
            except RdmaError:
                pass  # an error completion also means the QP is in ERROR: the rest flushes

    def _release_waiters(self, peer: _Peer) -> None:
        """Wake fence waiters left in the queue once the worker has stopped (nothing more posts)."""
        while True:
            try:
                job = peer.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.done.set()

    def _wait_fence(self, peer: _Peer, fence: _Job) -> bool:
        deadline = time.monotonic() + self._completion_timeout_s + 1
        while not fence.done.wait(0.05):
            worker = peer.worker
            if worker is not None and not worker.is_alive():
                return True  # the worker exited after draining: nothing more can land
            if time.monotonic() > deadline:
                return False
        return True

    def _read_loop(self, peer: _Peer) -> None:
        while peer.broken is None:
            try:
                message = messages.recv_message(peer.sock)
            except (OSError, ConnectionError, RdmaError) as exc:
                self._break(peer, f"rdma side channel lost: {exc}")
                return
            if isinstance(message, RequestGrant):
                with peer.grant_arrived:
                    req_id = message.req_id
                    count_down(peer.unanswered, req_id)
                    if peer.stale.get(req_id):
                        count_down(peer.stale, req_id)  # answers a Begin of a forgotten incarnation
                    else:
                        peer.grants[req_id] = message
                    peer.grant_arrived.notify_all()
            elif isinstance(message, RequestResult):
                with peer.grant_arrived:
                    peer.grants.pop(message.req_id, None)
                self._requests.resolve(message.req_id, message.ok, f"rdma target: {message.reason}")

    # ------------------------------------------------------------------ helpers

    def _peer(self, peer_id: str, req_id: str) -> _Peer:
        with self._lock:
            peer = self._peers.get(peer_id)
        if peer is None or peer.broken is not None:
            reason = (
                "not connected" if peer is None else f"connection broken ({peer.broken}); connect() again"
            )
            raise NotConnectedError(f"rdma initiator: {reason}", req_id=req_id, peer=peer_id)
        return peer

    def _break(self, peer: _Peer, reason: str) -> None:
        """Fail every PENDING request of ``peer``; the worker stops posting and drains. Its QPs
        wait for ``connect`` to re-create them."""
        with self._lock:
            first = peer.broken is None
            if first:
                peer.broken = reason
        if first:
            log.warning("rdma peer broken", peer=peer.peer_id, reason=reason)
        self._requests.fail_peer(peer.peer_id, reason)
        with peer.grant_arrived:
            peer.grant_arrived.notify_all()
        peer.jobs.put(None)
        try:
            peer.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _retire(self, peer: _Peer) -> None:
        peer.jobs.put(None)
        peer.sock.close()
        if peer.worker is not None:
            peer.worker.join(timeout=self._completion_timeout_s + 1)
            if peer.worker.is_alive():
                return  # still inside a verbs call: leaking its QPs beats destroying them under it
        for lane in peer.lanes:
            lane.conn.close()
