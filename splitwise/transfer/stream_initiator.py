"""P's side of the stream transports (tcp, ipc): one connection, sender and reader thread per
peer. See ``stream_target`` for the picture of both sides."""

from __future__ import annotations

import abc
import queue
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from splitwise.counters import Counters
from splitwise.engine.kv_cache import KVCache, KVCacheGeometry
from splitwise.logging import get_logger
from splitwise.transfer import wire
from splitwise.transfer.base import (
    BlockRun,
    Endpoint,
    TransferStatus,
    TransportInitiator,
    TransportOptions,
    check_block_ids,
    check_compatible,
    coalesce_runs,
)
from splitwise.transfer.errors import (
    ConnectionLostError,
    IncompatiblePeerError,
    NotConnectedError,
    NotRegisteredError,
    ProtocolError,
    TransferError,
)
from splitwise.transfer.messages import (
    RequestAbort,
    RequestFinish,
    RequestGrant,
    RequestResult,
    XferHello,
    XferHelloReply,
    expect_type,
)
from splitwise.transfer.tracking import InitiatorRequests
from splitwise.transfer.wire import shutdown

log = get_logger("splitwise.transfer")


@dataclass
class LayerJob:
    req_id: str
    layer: int
    runs: list[BlockRun]
    num_blocks: int
    ready: Any = None  # e.g. a CUDA event the copy must wait for


@dataclass
class FinishJob:
    req_id: str


@dataclass
class AbortJob:
    req_id: str
    reason: str


@dataclass
class Peer:
    """One connected target, as the initiator sees it."""

    peer_id: str
    sock: socket.socket
    geometry: KVCacheGeometry
    attachment: Any = None  # the subclass's handle on the peer's memory (ipc mapping)
    jobs: queue.Queue[LayerJob | FinishJob | AbortJob | None] = field(default_factory=queue.Queue)
    broken: threading.Event = field(default_factory=threading.Event)
    grants: dict[str, RequestGrant] = field(default_factory=dict)  # ipc: req_id -> D's answer to Begin
    grant_arrived: threading.Condition = field(default_factory=threading.Condition)
    threads: list[threading.Thread] = field(default_factory=list)
    # The request whose job the sender thread is executing right now (``forget`` waits for it).
    busy_req: str | None = None
    idle: threading.Condition = field(default_factory=threading.Condition)


_FORGET_WAIT_S = 5.0  # bound on how long forget() waits for a copy already under way


def _not_busy_with(peer: Peer, req_id: str) -> Callable[[], bool]:
    return lambda: peer.busy_req != req_id


class StreamInitiator(TransportInitiator):
    def __init__(self, options: TransportOptions) -> None:
        self.options = options
        self.counters = Counters()
        self._requests = InitiatorRequests(self.protocol, self.counters)
        self._kv: KVCache | None = None
        self._peers: dict[str, Peer] = {}
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()

    # ---- contract
    def register(self, kv_cache: KVCache) -> None:
        if self._kv is not None:
            raise TransferError(f"{self.protocol} initiator: register called twice")
        self._attach_local(kv_cache)
        self._kv = kv_cache

    def connect(self, peer_id: str, endpoint: Endpoint) -> None:
        with self._connect_lock:  # two racing connects to one peer would leave an orphan connection
            self._connect(peer_id, endpoint)

    def _connect(self, peer_id: str, endpoint: Endpoint) -> None:
        kv = self._require_kv()
        with self._lock:
            existing = self._peers.get(peer_id)
        if existing is not None and not existing.broken.is_set():
            return
        if existing is not None:
            self._drop_peer(existing)
        if endpoint.protocol != self.protocol:
            raise IncompatiblePeerError(
                f"endpoint is for {endpoint.protocol!r}, not {self.protocol!r}", peer=peer_id
            )
        remote = endpoint.geometry
        check_compatible(kv.geometry, remote, peer=peer_id)
        sock = wire.connect(endpoint.host, endpoint.port, self.options.connect_timeout_s)
        try:
            reply = self._hello(sock, kv, peer_id, endpoint.access_key)
            if not reply.ok:
                raise IncompatiblePeerError(f"target refused the connection: {reply.reason}", peer=peer_id)
            attachment = self._attach_peer(peer_id, endpoint, remote)
        except BaseException:
            sock.close()
            raise
        peer = Peer(peer_id, sock, remote, attachment)
        for loop, name in ((self._send_loop, "send"), (self._read_loop, "read")):
            thread = threading.Thread(
                target=loop, args=(peer,), name=f"{self.protocol}-{name}-{peer_id}", daemon=True
            )
            peer.threads.append(thread)
        with self._lock:
            self._peers[peer_id] = peer
        for thread in peer.threads:
            thread.start()

    def write_layer(
        self,
        peer_id: str,
        req_id: str,
        layer: int,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
    ) -> None:
        kv = self._require_kv()
        peer = self._peer(peer_id, req_id)
        try:
            if not 0 <= layer < kv.geometry.num_layers:
                raise TransferError(f"layer {layer} outside 0..{kv.geometry.num_layers - 1}", req_id=req_id)
            check_block_ids(src_block_ids, kv.geometry.num_blocks, side="source", req_id=req_id)
            check_block_ids(dst_block_ids, peer.geometry.num_blocks, side="destination", req_id=req_id)
            runs = coalesce_runs(src_block_ids, dst_block_ids)
        except TransferError as exc:
            # A layer that is not shipped must never let D report the request DONE: fail it on both
            # sides (the abort is queued behind the writes already accepted), then tell the caller.
            self._start(peer, req_id)
            self._requests.resolve(req_id, False, f"write_layer refused: {exc}")
            peer.jobs.put(AbortJob(req_id, f"write_layer refused: {exc}"))
            raise
        self._start(peer, req_id)
        peer.jobs.put(LayerJob(req_id, layer, runs, len(src_block_ids), self._ready_marker()))

    def finish(self, peer_id: str, req_id: str) -> None:
        peer = self._peer(peer_id, req_id)
        self._start(peer, req_id)
        peer.jobs.put(FinishJob(req_id))

    def _start(self, peer: Peer, req_id: str) -> None:
        self._requests.start(req_id, peer.peer_id)
        # Checked after start(): either _peer_lost's fail_peer sees this request, or we see broken.
        if peer.broken.is_set():
            self._requests.resolve(req_id, False, f"connection to {peer.peer_id} is lost; connect() again")

    def poll(self, req_id: str) -> TransferStatus:
        return self._requests.poll(req_id)

    def wait(self, req_id: str, timeout_s: float) -> TransferStatus:
        return self._requests.wait(req_id, timeout_s)

    def forget(self, req_id: str) -> None:
        """Queued jobs of ``req_id`` are skipped from now on, and a job of it already running on a
        sender thread is waited for (bounded): once this returns, no more of its bytes land on the
        peer, so D may reuse those blocks when P acknowledges a cancel."""
        self._requests.forget(req_id)
        with self._lock:
            peers = list(self._peers.values())
        for peer in peers:
            with peer.grant_arrived:
                peer.grants.pop(req_id, None)
            if any(t is threading.current_thread() for t in peer.threads):
                continue  # called from this peer's own sender/reader: nothing else can be running
            with peer.idle:
                if not peer.idle.wait_for(_not_busy_with(peer, req_id), timeout=_FORGET_WAIT_S):
                    self.counters.inc("forget_wait_timeouts")
                    log.warning(
                        "forget: a copy is still running",
                        protocol=self.protocol,
                        req_id=req_id,
                        peer=peer.peer_id,
                    )

    def close(self) -> None:
        with self._lock:
            peers = list(self._peers.values())
            self._peers.clear()
        for peer in peers:
            self._drop_peer(peer)
        self._requests.fail_all("initiator closed")

    # ---- hooks
    def _attach_local(self, kv_cache: KVCache) -> None:
        """Check the KV cache suits this transport and prepare views of it."""

    def _attach_peer(self, peer_id: str, endpoint: Endpoint, geometry: KVCacheGeometry) -> Any:
        """Map the peer's memory if the protocol writes it directly; returned as ``Peer.attachment``."""
        return None

    def _detach_peer(self, peer: Peer) -> None:
        """Release ``peer.attachment``."""

    def _ready_marker(self) -> Any:
        """Called on the caller's thread in write_layer: a marker the copy must wait for (CUDA event)."""
        return None

    @abc.abstractmethod
    def _write_layer(self, peer: Peer, job: LayerJob) -> None:
        """Move one layer's runs to the peer (sender thread): copy into its mapped memory (ipc) or
        send a frame (tcp)."""

    def _before_finish(self, peer: Peer, req_id: str) -> None:
        """Make every earlier write of ``req_id`` visible to the peer before the finish notice."""

    # ---- peer threads
    def _send_loop(self, peer: Peer) -> None:
        while True:
            job = peer.jobs.get()
            if job is None:
                return
            if isinstance(job, AbortJob):
                self._send_abort(peer, job.req_id, job.reason)
                continue
            with peer.idle:
                if peer.broken.is_set() or not self._requests.is_pending(job.req_id):
                    continue  # forgotten, failed, or the connection is gone: skip, already reported
                peer.busy_req = job.req_id  # under the lock: forget() either sees it or we see the forget
            try:
                self._run_job(peer, job)
            finally:
                with peer.idle:
                    peer.busy_req = None
                    peer.idle.notify_all()

    def _run_job(self, peer: Peer, job: LayerJob | FinishJob) -> None:
        try:
            if isinstance(job, LayerJob):
                self._write_layer(peer, job)
                self._requests.count(job.req_id, job.num_blocks)
            else:
                self._before_finish(peer, job.req_id)
                with peer.grant_arrived:
                    peer.grants.pop(job.req_id, None)
                total = self._requests.count(job.req_id, 0)
                wire.send_message(peer.sock, RequestFinish(job.req_id, total))
        except ConnectionLostError as exc:
            self._peer_lost(peer, str(exc))
        except Exception as exc:  # a failed copy must fail the request, never pass silently
            self._abort(peer, job.req_id, f"{type(exc).__name__}: {exc}")

    def _abort(self, peer: Peer, req_id: str, reason: str) -> None:
        self.counters.inc("write_errors")
        log.error(
            "transfer write failed", protocol=self.protocol, req_id=req_id, peer=peer.peer_id, reason=reason
        )
        self._send_abort(peer, req_id, reason)  # first, so D has failed it when P's caller sees FAILED
        self._requests.resolve(req_id, False, f"write failed: {reason}")

    def _send_abort(self, peer: Peer, req_id: str, reason: str) -> None:
        if peer.broken.is_set():
            return  # D fails the request itself when the connection drops
        try:
            wire.send_message(peer.sock, RequestAbort(req_id, reason))
        except ConnectionLostError as exc:
            self._peer_lost(peer, str(exc))

    def _read_loop(self, peer: Peer) -> None:
        try:
            while True:
                message = wire.recv_message(peer.sock)
                if isinstance(message, RequestGrant):
                    with peer.grant_arrived:
                        peer.grants[message.req_id] = message
                        peer.grant_arrived.notify_all()
                else:
                    verdict = expect_type(message, RequestResult)
                    self._requests.resolve(verdict.req_id, verdict.ok, f"target: {verdict.reason}")
        except (ConnectionLostError, ProtocolError) as exc:
            self._peer_lost(peer, str(exc))
        with peer.grant_arrived:
            peer.grant_arrived.notify_all()  # wake a sender waiting for a grant that will never come

    def _peer_lost(self, peer: Peer, reason: str) -> None:
        if peer.broken.is_set():
            return
        peer.broken.set()
        self.counters.inc("connections_lost")
        log.warning("target connection lost", protocol=self.protocol, peer=peer.peer_id, reason=reason)
        self._requests.fail_peer(peer.peer_id, f"connection to {peer.peer_id} lost: {reason}")
        shutdown(peer.sock)

    def _drop_peer(self, peer: Peer) -> None:
        peer.broken.set()
        peer.jobs.put(None)
        shutdown(peer.sock)
        for thread in peer.threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5.0)
        peer.sock.close()
        self._requests.fail_peer(peer.peer_id, "connection closed")
        self._detach_peer(peer)

    def _hello(self, sock: socket.socket, kv: KVCache, peer_id: str, access_key: str) -> XferHelloReply:
        initiator_id = f"{socket.gethostname()}:{id(self):x}"
        try:
            wire.send_message(sock, XferHello(initiator_id, kv.geometry, access_key))
            return expect_type(wire.recv_message(sock), XferHelloReply)  # type: ignore[no-any-return]
        finally:
            sock.settimeout(None)

    def _peer(self, peer_id: str, req_id: str) -> Peer:
        with self._lock:
            peer = self._peers.get(peer_id)
        if peer is None:
            raise NotConnectedError("connect(peer_id, endpoint) first", req_id=req_id, peer=peer_id)
        return peer

    def _require_kv(self) -> KVCache:
        if self._kv is None:
            raise NotRegisteredError(f"{self.protocol} initiator: register(kv_cache) first")
        return self._kv
