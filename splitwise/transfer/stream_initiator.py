"""P's side of the stream transports (tcp, ipc): one connection, sender and reader thread per
peer. See ``stream_target`` for the picture of both sides."""

from __future__ import annotations

import abc
import functools
import queue
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from splitwise.counters import Counters
from splitwise.engine.kv_cache import KVCache, KVCacheGeometry
from splitwise.logging import get_logger
from splitwise.transfer import wire
from splitwise.transfer.base import (
    BlockRun,
    Endpoint,
    ReadyToken,
    RunArrays,
    TransferStatus,
    TransportInitiator,
    TransportOptions,
    check_block_ids,
    check_compatible,
    coalesce_arrays,
    wait_ready,
)
from splitwise.transfer.errors import (
    ConnectionLostError,
    IncompatiblePeerError,
    NotConnectedError,
    NotRegisteredError,
    ProtocolError,
    TransferError,
    TransferTimeoutError,
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
    arrays: RunArrays  # the block pairs and their runs as numpy columns (ipc copies from these)
    num_blocks: int
    ready: ReadyToken | None = None  # the producer's token: read nothing before it completed

    @functools.cached_property
    def runs(self) -> list[BlockRun]:
        """The runs as objects, built on the sender thread when a transport asks (tcp)."""
        return self.arrays.runs()


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
    # ipc: Begins not answered yet, and answers to drop because their request was forgotten
    # meanwhile (a later write_layer of the same req_id must not copy with that stale grant).
    unanswered: dict[str, int] = field(default_factory=dict)
    stale: dict[str, int] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)
    # The request whose job the sender thread is executing right now (``forget`` waits for it).
    busy_req: str | None = None
    idle: threading.Condition = field(default_factory=threading.Condition)


_FORGET_WAIT_S = 5.0  # bound on how long forget() waits for a copy already under way


def _not_busy_with(peer: Peer, req_id: str) -> Callable[[], bool]:
    return lambda: peer.busy_req != req_id


class StreamInitiator(TransportInitiator):
    # One-sided writes (ipc) land without D's help, so P hangs up only once none can land any more:
    # D's ``revoke`` waits for that hang-up. Two-sided (tcp): D's reader is the only way in.
    one_sided = False

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
        check_compatible(kv.geometry, remote, peer=peer_id, head_remap=True)  # ipc/tcp remap at P
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
        ready: ReadyToken | None = None,
    ) -> None:
        kv = self._require_kv()
        peer = self._peer(peer_id, req_id)
        try:
            if not 0 <= layer < kv.geometry.num_layers:
                raise TransferError(f"layer {layer} outside 0..{kv.geometry.num_layers - 1}", req_id=req_id)
            src = np.asarray(src_block_ids, dtype=np.int64)  # once: the checks and the runs share it
            dst = np.asarray(dst_block_ids, dtype=np.int64)
            check_block_ids(src, kv.geometry.num_blocks, side="source", req_id=req_id)
            check_block_ids(dst, peer.geometry.num_blocks, side="destination", req_id=req_id)
            arrays = coalesce_arrays(src, dst)
        except TransferError as exc:
            # A layer that is not shipped must never let D report the request DONE: fail it on both
            # sides (the abort is queued behind the writes already accepted), then tell the caller.
            self._start(peer, req_id)
            self._requests.resolve(req_id, False, f"write_layer refused: {exc}")
            peer.jobs.put(AbortJob(req_id, f"write_layer refused: {exc}"))
            raise
        self._start(peer, req_id)
        token = ready if ready is not None else self._ready_marker()
        peer.jobs.put(LayerJob(req_id, layer, arrays, len(src_block_ids), token))

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
        """Queued jobs of ``req_id`` are skipped from now on, a job of it already running on a
        sender thread is waited for, and so are the copies it queued on a device (``_fence``):
        once this returns, no more of its bytes land on the peer, so D may reuse those blocks when
        P acknowledges a cancel. Past ``_FORGET_WAIT_S`` the peer's connection is broken instead."""
        self._requests.forget(req_id)
        with self._lock:
            peers = list(self._peers.values())
        for peer in peers:
            with peer.grant_arrived:
                peer.grants.pop(req_id, None)
                if peer.unanswered.get(req_id):
                    peer.stale[req_id] = peer.unanswered[req_id]
                peer.grant_arrived.notify_all()  # a sender waiting for this grant gives up now
            if any(t is threading.current_thread() for t in peer.threads):
                continue  # called from this peer's own sender/reader: nothing else can be running
            with peer.idle:
                idle = peer.idle.wait_for(_not_busy_with(peer, req_id), timeout=_FORGET_WAIT_S)
            if not idle:
                self.counters.inc("forget_wait_timeouts")
                log.warning(
                    "forget: a copy is still running; dropping the connection",
                    protocol=self.protocol,
                    req_id=req_id,
                    peer=peer.peer_id,
                )
                self._peer_lost(peer, "a cancelled request's copy did not finish in time")
                raise TransferTimeoutError(
                    "a copy of the forgotten request did not finish in time", req_id=req_id, peer=peer.peer_id
                )
        self._fence(req_id)

    def abort_peer(self, peer_id: str, reason: str) -> None:
        """P's control connection to ``peer_id`` dropped: stop writing to it (see the contract)."""
        with self._lock:
            peer = self._peers.get(peer_id)
        if peer is None:
            return
        self.counters.inc("peers_aborted")
        self._peer_lost(peer, f"aborted: {reason}")

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

    def _await_ready(self, peer: Peer, job: LayerJob) -> bool:
        """Sender thread, before ``_write_layer``: wait for the producer's token (the ordering rule).
        False when the request was forgotten (or the peer broke) meanwhile: skip the job.
        A subclass that orders a device copy after the token instead (ipc on CUDA) overrides it."""
        return wait_ready(
            job.ready,
            is_cancelled=lambda: peer.broken.is_set() or not self._requests.is_pending(job.req_id),
        )

    def _after_write(self, peer: Peer, job: LayerJob) -> None:
        """Sender thread, after ``_write_layer`` returned: note what ``_fence`` must wait for."""

    def _fence(self, req_id: str | None) -> None:
        """Wait until the copies queued for ``req_id`` (None: for every request) completed. Only
        transports that queue asynchronous device copies (ipc on CUDA) have anything to wait for."""

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
                if not self._await_ready(peer, job):
                    return  # forgotten or broken while waiting for the producer: nothing read
                self._write_layer(peer, job)
                self._after_write(peer, job)
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
                        req_id = message.req_id
                        count_down(peer.unanswered, req_id)
                        if peer.stale.get(req_id):
                            count_down(peer.stale, req_id)  # for a forgotten incarnation: dropped
                        else:
                            peer.grants[req_id] = message
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
        peer.broken.set()  # the sender skips every job from now on
        with peer.grant_arrived:
            peer.grant_arrived.notify_all()  # a sender waiting for a grant gives up now
        self.counters.inc("connections_lost")
        log.warning("target connection lost", protocol=self.protocol, peer=peer.peer_id, reason=reason)
        self._requests.fail_peer(peer.peer_id, f"connection to {peer.peer_id} lost: {reason}")
        if self.one_sided:
            self._quiesce(peer)
        shutdown(peer.sock)

    def _quiesce(self, peer: Peer) -> None:
        """Wait until the sender runs no job and the device copies it queued are done. The socket is
        shut only after this: D (ipc ``revoke``) takes our hang-up to mean nothing more lands."""
        sender = peer.threads[0] if peer.threads else None
        if sender is not None and sender is not threading.current_thread():
            with peer.idle:
                if not peer.idle.wait_for(lambda: peer.busy_req is None, timeout=_FORGET_WAIT_S):
                    self.counters.inc("forget_wait_timeouts")
        self._fence(None)

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
        # D's ``revoke(peer_id)`` finds our connections by this id: our node id when we have one.
        initiator_id = self.options.node_id or f"{socket.gethostname()}:{id(self):x}"
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


def count_down(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
