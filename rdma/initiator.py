"""P's side of the rdma transport (TransportInitiator).

Per connected peer: one lane (RC QP) per local NIC, a worker thread that turns queued
``write_layer``/``finish`` calls into posted WRITEs (in call order), and a reader thread that takes
D's RequestResult verdicts off the TCP side channel.

    write_layer  -> coalesce_runs -> plan_layer (K then V, split at max message size)
                 -> stripe over lanes -> Lane.write (batches inside the send-queue depth)
    finish       -> Lane.notify on every lane (WRITE_WITH_IMM, imm = request_tag) -> drain
    RequestResult(ok) from D -> DONE          anything else -> FAILED (never DONE)

Any completion error, timeout or lost side channel breaks the peer: its PENDING requests fail
(the caller falls back), and the next ``connect`` re-creates the QPs with a new handshake.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from rdma import messages
from rdma.connection import QPPolicy, RcConnection
from rdma.errors import RdmaError
from rdma.gpu_memory import CudaDriver
from rdma.lane import Lane
from rdma.messages import Hello, HelloReply, RequestResult
from rdma.plan import plan_layer, stripe
from rdma.resources import GpuPolicy, NicResources, choose_nics, default_backend, open_nics
from rdma.verbs import Access, QPCaps, VerbsBackend
from splitwise.engine.kv_cache import KVCache, KVCacheGeometry
from splitwise.transfer.base import (
    DONE,
    PENDING,
    BlockRun,
    Endpoint,
    TransferCounters,
    TransferStatus,
    TransportInitiator,
    TransportOptions,
    check_block_ids,
    check_compatible,
    coalesce_runs,
    failed,
    geometry_from_dict,
    geometry_to_dict,
)
from splitwise.transfer.errors import (
    ConnectionLostError,
    IncompatiblePeerError,
    NotConnectedError,
    NotRegisteredError,
    TransferError,
)

SEND_QUEUE_DEPTH = 256


@dataclass(frozen=True)
class _Job:
    kind: str  # "write" | "finish"
    req_id: str
    layer: int = -1
    runs: list[BlockRun] = field(default_factory=list)


@dataclass
class _Peer:
    peer_id: str
    sock: socket.socket
    lanes: list[Lane]
    geometry: KVCacheGeometry
    jobs: queue.Queue[_Job | None] = field(default_factory=queue.Queue)
    broken: str | None = None  # the reason, once broken
    worker: threading.Thread | None = None


class RdmaInitiator(TransportInitiator):
    protocol = "rdma"

    def __init__(
        self,
        options: TransportOptions,
        *,
        backend: VerbsBackend | None = None,
        nics: Sequence[str] | None = None,
        policy: QPPolicy | None = None,
        initiator_id: str = "prefill",
        send_queue_depth: int = SEND_QUEUE_DEPTH,
        completion_timeout_s: float = 30.0,
        cuda_driver: CudaDriver | None = None,
    ) -> None:
        self.options = options
        self.counters = TransferCounters()
        self._backend = backend
        self._gpu_policy = GpuPolicy.from_options(options, cuda_driver)
        self._nic_names = list(nics) if nics else None
        self._policy = policy or QPPolicy()
        self._initiator_id = initiator_id
        self._caps = QPCaps(max_send_wr=send_queue_depth, max_recv_wr=1)
        self._completion_timeout_s = completion_timeout_s
        self._lock = threading.Condition()
        self._nics: list[NicResources] = []
        self._kv_cache: KVCache | None = None
        self._peers: dict[str, _Peer] = {}
        self._requests: dict[str, tuple[str, TransferStatus]] = {}  # req_id -> (peer_id, status)
        self._closed = False

    # ------------------------------------------------------------------ set-up

    def register(self, kv_cache: KVCache) -> None:
        backend = self._backend or default_backend(self.options)
        names = self._nic_names or choose_nics(kv_cache, self.options)
        self._nics = open_nics(
            backend, names, kv_cache, Access.LOCAL_WRITE, gpu=self._gpu_policy, counters=self.counters
        )
        self._kv_cache = kv_cache

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
        if endpoint.protocol != "rdma" or endpoint.schema != messages.SCHEMA_VERSION:
            raise IncompatiblePeerError(
                f"not an rdma endpoint of schema {messages.SCHEMA_VERSION}", peer=peer_id
            )
        check_compatible(self._kv_cache.geometry, endpoint.geometry, peer=peer_id)
        conns = [
            RcConnection(nic.device, nic.port, caps=self._caps, policy=self._policy) for nic in self._nics
        ]
        try:
            sock = socket.create_connection(
                (endpoint.host, endpoint.port), timeout=self.options.connect_timeout_s
            )
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = Hello(
                self._initiator_id,
                geometry_to_dict(self._kv_cache.geometry),
                [c.local_endpoint() for c in conns],
            )
            messages.send_message(sock, hello)
            reply = messages.recv_message(sock)
            if not isinstance(reply, HelloReply) or not reply.ok:
                reason = reply.reason if isinstance(reply, HelloReply) else "unexpected reply"
                sock.close()
                raise IncompatiblePeerError(f"rdma target refused the connection: {reason}", peer=peer_id)
            if len(reply.lanes) != len(conns):
                sock.close()
                raise IncompatiblePeerError(
                    f"{len(reply.lanes)} lanes offered for {len(conns)} asked", peer=peer_id
                )
            for conn, lane in zip(conns, reply.lanes, strict=True):
                conn.connect(lane.qp)
            sock.settimeout(None)
        except (OSError, ConnectionError) as exc:
            for conn in conns:
                conn.close()
            raise ConnectionLostError(
                f"rdma side channel to {endpoint.host}:{endpoint.port}: {exc}", peer=peer_id
            ) from None
        except Exception:
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
        return _Peer(peer_id, sock, lanes, geometry_from_dict(reply.geometry))

    # ------------------------------------------------------------------ per request

    def write_layer(
        self,
        peer_id: str,
        req_id: str,
        layer: int,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
    ) -> None:
        if self._kv_cache is None:
            raise NotRegisteredError("rdma initiator: write_layer() before register()", req_id=req_id)
        peer = self._peer(peer_id, req_id)
        check_block_ids(src_block_ids, self._kv_cache.geometry.num_blocks, side="source", req_id=req_id)
        check_block_ids(dst_block_ids, peer.geometry.num_blocks, side="destination", req_id=req_id)
        if not 0 <= layer < self._kv_cache.geometry.num_layers:
            raise TransferError(f"layer {layer} out of range", req_id=req_id, peer=peer_id)
        runs = coalesce_runs(src_block_ids, dst_block_ids)
        with self._lock:
            self._requests.setdefault(req_id, (peer_id, PENDING))
        peer.jobs.put(_Job("write", req_id, layer, runs))

    def finish(self, peer_id: str, req_id: str) -> None:
        peer = self._peer(peer_id, req_id)
        with self._lock:
            self._requests.setdefault(req_id, (peer_id, PENDING))
        peer.jobs.put(_Job("finish", req_id))

    def poll(self, req_id: str) -> TransferStatus:
        with self._lock:
            found = self._requests.get(req_id)
        return found[1] if found is not None else failed(f"rdma initiator: unknown request {req_id}")

    def wait(self, req_id: str, timeout_s: float) -> TransferStatus:
        with self._lock:
            self._lock.wait_for(lambda: self._status(req_id).is_finished, timeout=timeout_s)
            return self._status(req_id)

    def forget(self, req_id: str) -> None:
        with self._lock:
            self._requests.pop(req_id, None)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            self._break(peer, "rdma initiator closed")
            self._retire(peer)
        for nic in self._nics:
            nic.close()
        self._nics = []

    # ------------------------------------------------------------------ threads

    def _work_loop(self, peer: _Peer) -> None:
        max_msg_bytes = min(lane.conn.port.max_msg_bytes for lane in peer.lanes)
        while True:
            job = peer.jobs.get()
            if job is None or peer.broken is not None:
                return
            req_id = job.req_id
            if self._status(req_id) is not PENDING:
                continue  # forgotten or already failed: skip its queued work
            try:
                if job.kind == "write":
                    ops = plan_layer(
                        peer.geometry,
                        job.layer,
                        job.runs,
                        local_base=0,
                        remote_base=0,
                        max_msg_bytes=max_msg_bytes,
                    )
                    for lane, lane_ops in zip(peer.lanes, stripe(ops, len(peer.lanes)), strict=True):
                        lane.write(lane_ops, req_id)
                    self.counters.inc("layers_posted")
                else:
                    tag = messages.request_tag(req_id)
                    for lane in peer.lanes:
                        lane.notify(tag, req_id)
                    for lane in peer.lanes:
                        lane.drain(req_id)
            except RdmaError as exc:
                self.counters.inc("completion_errors")
                self._break(peer, f"rdma: {exc}")
                return

    def _read_loop(self, peer: _Peer) -> None:
        while peer.broken is None:
            try:
                message = messages.recv_message(peer.sock)
            except (OSError, ConnectionError, RdmaError) as exc:
                self._break(peer, f"rdma side channel lost: {exc}")
                return
            if isinstance(message, RequestResult):
                self._settle(message.req_id, DONE if message.ok else failed(f"rdma target: {message.reason}"))

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

    def _status(self, req_id: str) -> TransferStatus:
        found = self._requests.get(req_id)
        return found[1] if found is not None else failed(f"rdma initiator: unknown request {req_id}")

    def _settle(self, req_id: str, status: TransferStatus) -> None:
        with self._lock:
            found = self._requests.get(req_id)
            if found is not None and found[1] is PENDING:
                self._requests[req_id] = (found[0], status)
                self.counters.inc("transfers_done" if status.is_done else "transfers_failed")
            self._lock.notify_all()

    def _break(self, peer: _Peer, reason: str) -> None:
        """Fail every PENDING request of ``peer``; its QPs wait for ``connect`` to re-create them."""
        with self._lock:
            if peer.broken is None:
                peer.broken = reason
            pending = [r for r, (p, s) in self._requests.items() if p == peer.peer_id and s is PENDING]
        for req_id in pending:
            self._settle(req_id, failed(reason))
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
