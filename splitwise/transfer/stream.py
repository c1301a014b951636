"""The connection machinery tcp and ipc share: D listens, P keeps one TCP connection per peer.

Threads, deliberately (not asyncio): the I/O is blocking ``sendmsg``/``recv_into`` straight on the
KV buffer, which releases the GIL for the whole copy, and the callers (P's engine thread calling
``write_layer`` between layers, D's engine thread polling) are plain threads. Per connection::

    D (StreamTarget)                         P (StreamInitiator)
    accept thread  -> one reader thread      sender thread: job queue in call order (writes, finish)
                      per P connection       reader thread: RequestResult verdicts from D

Only the reader thread writes to a socket on D (its replies); only the sender thread writes on P.
Subclasses fill in the protocol: how a layer moves (``_write_layer`` on P, ``_on_layer_write``
on D) and what the endpoint carries besides host/port/geometry.
"""

from __future__ import annotations

import itertools
import queue
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from splitwise.engine.kv_cache import KVCache, KVCacheGeometry
from splitwise.logging import get_logger
from splitwise.transfer import wire
from splitwise.transfer.base import (
    BlockRun,
    Endpoint,
    TransferCounters,
    TransferStatus,
    TransportInitiator,
    TransportOptions,
    TransportTarget,
    check_block_ids,
    check_compatible,
    coalesce_runs,
    geometry_from_dict,
    geometry_to_dict,
)
from splitwise.transfer.errors import (
    ConnectionLostError,
    IncompatiblePeerError,
    NotConnectedError,
    NotRegisteredError,
    ProtocolError,
    TransferError,
    UnexpectedBlocksError,
)
from splitwise.transfer.messages import (
    LayerWrite,
    Message,
    RequestAbort,
    RequestBegin,
    RequestFinish,
    RequestGrant,
    RequestResult,
    XferHello,
    XferHelloReply,
    expect_type,
)
from splitwise.transfer.tracking import Clock, InitiatorRequests, TargetRequests

log = get_logger("splitwise.transfer")


class StreamTarget(TransportTarget):
    count_writes = True  # every write passes through this socket, so D can count them

    def __init__(self, options: TransportOptions, clock: Clock = time.monotonic) -> None:
        self.options = options
        self.counters = TransferCounters()
        self._requests = TargetRequests(self.protocol, self.counters, clock)
        self._kv: KVCache | None = None
        self._listener: socket.socket | None = None
        self._conn_ids = itertools.count(1)
        self._conns: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []

    # ---- contract
    def register(self, kv_cache: KVCache) -> None:
        if self._kv is not None:
            raise TransferError(f"{self.protocol} target: register called twice")
        self._attach_local(kv_cache)
        self._kv = kv_cache
        self._listener = wire.listen(self.options.host, self.options.port)
        self._spawn(self._accept_loop, "accept")

    def endpoint(self) -> Endpoint:
        kv = self._require_kv()
        assert self._listener is not None
        return {
            "protocol": self.protocol,
            "host": self.options.host,
            "port": int(self._listener.getsockname()[1]),
            "geometry": geometry_to_dict(kv.geometry),
            **self._endpoint_extra(kv),
        }

    def expect(self, req_id: str, dst_block_ids: Sequence[int], timeout_s: float | None = None) -> None:
        check_block_ids(dst_block_ids, self._require_kv().geometry.num_blocks, side="destination", req_id=req_id)
        self._requests.expect(req_id, dst_block_ids, timeout_s)

    def poll(self, req_id: str) -> TransferStatus:
        return self._requests.poll(req_id)

    def forget(self, req_id: str) -> None:
        self._requests.forget(req_id)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._listener is not None:
            _shutdown(self._listener)
        with self._lock:
            conns = list(self._conns.values())
        for sock in conns:
            _shutdown(sock)
        for thread in self._threads:
            thread.join(timeout=5.0)
        if self._listener is not None:
            self._listener.close()
        self._requests.fail_all("target closed")
        self._detach_local()

    # ---- hooks
    def _attach_local(self, kv_cache: KVCache) -> None:
        """Check the KV cache suits this transport and prepare views of it."""

    def _detach_local(self) -> None:
        """Release what ``_attach_local`` prepared."""

    def _endpoint_extra(self, kv_cache: KVCache) -> dict[str, Any]:
        return {}

    def _on_layer_write(self, conn_id: int, sock: socket.socket, header: LayerWrite) -> None:
        raise ProtocolError(f"{self.protocol}: LayerWrite frames are not part of this protocol")

    # ---- connection threads
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                sock, addr = self._listener.accept()
            except OSError as exc:
                if not self._closed.is_set():
                    self.counters.incr("accept_errors")
                    log.error("accept failed", protocol=self.protocol, error=str(exc))
                    time.sleep(0.05)
                continue
            conn_id = next(self._conn_ids)
            with self._lock:
                self._conns[conn_id] = sock
            self._spawn(self._serve, f"conn-{conn_id}", conn_id, sock, f"{addr[0]}:{addr[1]}")

    def _serve(self, conn_id: int, sock: socket.socket, peer: str) -> None:
        reason = "closed"
        try:
            self._handshake(sock, peer)
            while True:
                self._dispatch(conn_id, sock, wire.recv_message(sock))
        except ConnectionLostError as exc:
            reason = str(exc)
            if not self._closed.is_set():
                self.counters.incr("connections_lost")
                log.info("initiator connection closed", protocol=self.protocol, peer=peer, reason=reason)
        except (ProtocolError, IncompatiblePeerError, TransferError) as exc:
            reason = str(exc)
            self.counters.incr("connections_refused")
            log.warning("initiator connection refused", protocol=self.protocol, peer=peer, reason=reason)
        finally:
            self._requests.connection_lost(conn_id, reason)
            with self._lock:
                self._conns.pop(conn_id, None)
            sock.close()

    def _handshake(self, sock: socket.socket, peer: str) -> None:
        kv = self._require_kv()
        sock.settimeout(self.options.connect_timeout_s)
        hello = expect_type(wire.recv_message(sock), XferHello)
        local = geometry_to_dict(kv.geometry)
        try:
            check_compatible(kv.geometry, geometry_from_dict(hello.geometry), peer=hello.initiator_id)
        except (IncompatiblePeerError, KeyError, ValueError, TypeError) as exc:
            wire.send_message(sock, XferHelloReply(False, str(exc), local))
            raise IncompatiblePeerError(str(exc), peer=peer) from None
        wire.send_message(sock, XferHelloReply(True, "", local))
        sock.settimeout(None)

    def _dispatch(self, conn_id: int, sock: socket.socket, message: Message) -> None:
        if isinstance(message, LayerWrite):
            self._on_layer_write(conn_id, sock, message)
        elif isinstance(message, RequestBegin):
            try:
                allowed = self._requests.admit(message.req_id, conn_id)
            except UnexpectedBlocksError as exc:
                self.counters.incr("frames_rejected")
                wire.send_message(sock, RequestGrant(message.req_id, False, str(exc), []))
            else:
                self.counters.incr("requests_begun")
                wire.send_message(sock, RequestGrant(message.req_id, True, "", sorted(allowed)))
        elif isinstance(message, RequestAbort):
            self._requests.fail(message.req_id, f"initiator aborted: {message.reason}")
        elif isinstance(message, RequestFinish):
            status = self._requests.finish(message.req_id, conn_id, message.num_block_writes,
                                           count_writes=self.count_writes)
            wire.send_message(sock, RequestResult(message.req_id, status.is_done, status.reason or ""))
        else:
            raise ProtocolError(f"unexpected {message.TAG} frame from an initiator")

    def _refuse(self, sock: socket.socket, req_id: str, exc: TransferError) -> None:
        self.counters.incr("frames_rejected")
        log.warning("frame refused", protocol=self.protocol, req_id=req_id, reason=str(exc))
        wire.send_message(sock, RequestResult(req_id, False, str(exc)))

    def _require_kv(self) -> KVCache:
        if self._kv is None:
            raise NotRegisteredError(f"{self.protocol} target: register(kv_cache) first")
        return self._kv

    def _spawn(self, target: Any, name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=f"{self.protocol}-target-{name}", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()


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
class Peer:
    """One connected target, as the initiator sees it."""

    peer_id: str
    sock: socket.socket
    geometry: KVCacheGeometry
    attachment: Any = None  # the subclass's handle on the peer's memory (ipc mapping)
    jobs: queue.Queue[LayerJob | FinishJob | None] = field(default_factory=queue.Queue)
    broken: threading.Event = field(default_factory=threading.Event)
    grants: dict[str, RequestGrant] = field(default_factory=dict)  # ipc: req_id -> D's answer to Begin
    grant_arrived: threading.Condition = field(default_factory=threading.Condition)
    threads: list[threading.Thread] = field(default_factory=list)


class StreamInitiator(TransportInitiator):
    def __init__(self, options: TransportOptions) -> None:
        self.options = options
        self.counters = TransferCounters()
        self._requests = InitiatorRequests(self.protocol, self.counters)
        self._kv: KVCache | None = None
        self._peers: dict[str, Peer] = {}
        self._lock = threading.Lock()

    # ---- contract
    def register(self, kv_cache: KVCache) -> None:
        if self._kv is not None:
            raise TransferError(f"{self.protocol} initiator: register called twice")
        self._attach_local(kv_cache)
        self._kv = kv_cache

    def connect(self, peer_id: str, endpoint: Endpoint) -> None:
        kv = self._require_kv()
        with self._lock:
            existing = self._peers.get(peer_id)
        if existing is not None and not existing.broken.is_set():
            return
        if existing is not None:
            self._drop_peer(existing)
        if endpoint.get("protocol") != self.protocol:
            raise IncompatiblePeerError(f"endpoint is for {endpoint.get('protocol')!r}, not {self.protocol!r}",
                                        peer=peer_id)
        remote = geometry_from_dict(endpoint["geometry"])
        check_compatible(kv.geometry, remote, peer=peer_id)
        sock = wire.connect(str(endpoint["host"]), int(endpoint["port"]), self.options.connect_timeout_s)
        try:
            reply = self._hello(sock, kv, peer_id)
            if not reply.ok:
                raise IncompatiblePeerError(f"target refused the connection: {reply.reason}", peer=peer_id)
            attachment = self._attach_peer(peer_id, endpoint, remote)
        except BaseException:
            sock.close()
            raise
        peer = Peer(peer_id, sock, remote, attachment)
        for loop, name in ((self._send_loop, "send"), (self._read_loop, "read")):
            thread = threading.Thread(target=loop, args=(peer,), name=f"{self.protocol}-{name}-{peer_id}", daemon=True)
            peer.threads.append(thread)
        with self._lock:
            self._peers[peer_id] = peer
        for thread in peer.threads:
            thread.start()

    def write_layer(
        self, peer_id: str, req_id: str, layer: int, src_block_ids: Sequence[int], dst_block_ids: Sequence[int]
    ) -> None:
        kv = self._require_kv()
        peer = self._peer(peer_id, req_id)
        if not 0 <= layer < kv.geometry.num_layers:
            raise TransferError(f"layer {layer} outside 0..{kv.geometry.num_layers - 1}", req_id=req_id)
        check_block_ids(src_block_ids, kv.geometry.num_blocks, side="source", req_id=req_id)
        check_block_ids(dst_block_ids, peer.geometry.num_blocks, side="destination", req_id=req_id)
        runs = coalesce_runs(src_block_ids, dst_block_ids)
        self._requests.start(req_id, peer_id)
        peer.jobs.put(LayerJob(req_id, layer, runs, len(src_block_ids), self._ready_marker()))

    def finish(self, peer_id: str, req_id: str) -> None:
        peer = self._peer(peer_id, req_id)
        self._requests.start(req_id, peer_id)
        peer.jobs.put(FinishJob(req_id))

    def poll(self, req_id: str) -> TransferStatus:
        return self._requests.poll(req_id)

    def wait(self, req_id: str, timeout_s: float) -> TransferStatus:
        return self._requests.wait(req_id, timeout_s)

    def forget(self, req_id: str) -> None:
        self._requests.forget(req_id)

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

    def _write_layer(self, peer: Peer, job: LayerJob) -> None:
        raise NotImplementedError

    def _before_finish(self, peer: Peer, req_id: str) -> None:
        """Make every earlier write of ``req_id`` visible to the peer before the finish notice."""

    # ---- peer threads
    def _send_loop(self, peer: Peer) -> None:
        while True:
            job = peer.jobs.get()
            if job is None:
                return
            if peer.broken.is_set() or not self._requests.is_pending(job.req_id):
                continue  # forgotten, failed, or the connection is gone: skip, already reported
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
        self.counters.incr("write_errors")
        log.error("transfer write failed", protocol=self.protocol, req_id=req_id, peer=peer.peer_id, reason=reason)
        try:  # tell D first, so D has failed it by the time P's caller sees FAILED
            wire.send_message(peer.sock, RequestAbort(req_id, reason))
        except ConnectionLostError as exc:
            self._peer_lost(peer, str(exc))
        self._requests.resolve(req_id, False, f"write failed: {reason}")

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
        self.counters.incr("connections_lost")
        log.warning("target connection lost", protocol=self.protocol, peer=peer.peer_id, reason=reason)
        self._requests.fail_peer(peer.peer_id, f"connection to {peer.peer_id} lost: {reason}")
        _shutdown(peer.sock)

    def _drop_peer(self, peer: Peer) -> None:
        peer.broken.set()
        peer.jobs.put(None)
        _shutdown(peer.sock)
        for thread in peer.threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5.0)
        peer.sock.close()
        self._requests.fail_peer(peer.peer_id, "connection closed")
        self._detach_peer(peer)

    def _hello(self, sock: socket.socket, kv: KVCache, peer_id: str) -> XferHelloReply:
        initiator_id = f"{socket.gethostname()}:{id(self):x}"
        try:
            wire.send_message(sock, XferHello(initiator_id, geometry_to_dict(kv.geometry)))
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


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or never connected: nothing to wake

