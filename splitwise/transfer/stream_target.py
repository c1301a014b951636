"""The connection machinery tcp and ipc share (target side here, initiator side in
``stream_initiator``): D listens, P keeps one TCP connection per peer.

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

import dataclasses
import hmac
import itertools
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from splitwise.counters import Counters
from splitwise.engine.kv_cache import KVCache
from splitwise.logging import get_logger
from splitwise.transfer import wire
from splitwise.transfer.base import (
    Endpoint,
    TransferStatus,
    TransportOptions,
    TransportTarget,
    check_block_ids,
    check_compatible,
)
from splitwise.transfer.errors import (
    AuthenticationError,
    ConnectionLostError,
    IncompatiblePeerError,
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
from splitwise.transfer.tracking import AnyClock, TargetRequests
from splitwise.transfer.wire import shutdown

log = get_logger("splitwise.transfer")
# Connections still in their handshake, per listening port: more are closed at once.
MAX_HANDSHAKING = 32


class StreamTarget(TransportTarget):
    count_writes = True  # every write passes through this socket, so D can count them

    def __init__(self, options: TransportOptions, clock: AnyClock | None = None) -> None:
        self.options = options
        self.counters = Counters()
        self._requests = (
            TargetRequests(self.protocol, self.counters, clock)
            if clock is not None
            else TargetRequests(self.protocol, self.counters)
        )
        self._kv: KVCache | None = None
        self._listener: socket.socket | None = None
        self._conn_ids = itertools.count(1)
        self._conns: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._access_key = secrets.token_hex(16)  # a capability: handed out only inside endpoint()
        # Fencing: conn_id -> the initiator id from its hello, and -> the serve thread; and the
        # request whose payload a reader is receiving into D's blocks right now (``forget`` waits).
        self._conn_peers: dict[int, str] = {}
        self._conn_threads: dict[int, threading.Thread] = {}
        self._receiving: dict[int, str] = {}
        self._receiving_done = threading.Condition()

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
        endpoint = Endpoint(
            protocol=self.protocol,
            host=self.options.host,
            port=int(self._listener.getsockname()[1]),
            geometry=kv.geometry,
            access_key=self._access_key,
        )
        return dataclasses.replace(endpoint, **self._endpoint_extra(kv))

    def expect(self, req_id: str, dst_block_ids: Sequence[int], timeout_s: float | None = None) -> None:
        check_block_ids(
            dst_block_ids, self._require_kv().geometry.num_blocks, side="destination", req_id=req_id
        )
        self._requests.expect(req_id, dst_block_ids, timeout_s)

    def poll(self, req_id: str) -> TransferStatus:
        return self._requests.poll(req_id)

    def forget(self, req_id: str) -> None:
        """Refuse later frames for ``req_id`` and wait (bounded) for a payload of it that a reader is
        receiving into D's blocks right now: once this returns, no tcp byte of it lands any more."""
        with self._receiving_done:
            self._requests.forget(req_id)  # under the lock: no reader admits it after this
            done = self._receiving_done.wait_for(
                lambda: req_id not in self._receiving.values(), timeout=self.options.connect_timeout_s
            )
        if not done:
            self.counters.inc("forget_wait_timeouts")
            log.warning("forget: a payload is still being received", protocol=self.protocol, req_id=req_id)

    def revoke(self, peer_id: str) -> bool:
        """Close every connection from initiator ``peer_id``. Two-sided (tcp): done once its reader
        thread exited. One-sided (ipc): shut our side for writing and wait for P's hang-up, which P
        sends only after its copies stopped (``StreamInitiator._quiesce``)."""
        with self._lock:
            conns = [
                (conn_id, sock, self._conn_threads.get(conn_id))
                for conn_id, sock in self._conns.items()
                if self._conn_peers.get(conn_id) == peer_id
            ]
        self.counters.inc("revokes")
        fenced = True
        for conn_id, sock, thread in conns:
            self._requests.connection_lost(conn_id, f"access of {peer_id} revoked")
            if self.count_writes:
                shutdown(sock)  # our reader is the only way in: stopping it is the fence
            else:
                try:
                    sock.shutdown(socket.SHUT_WR)  # P's reader sees EOF, stops copying, hangs up
                except OSError:
                    pass  # already closed
            if thread is not None:
                thread.join(timeout=self.options.connect_timeout_s)
                fenced = fenced and not thread.is_alive()
        if not fenced:
            self.counters.inc("revokes_unconfirmed")
            log.error("revoke: peer did not hang up in time", protocol=self.protocol, peer=peer_id)
        return fenced

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._listener is not None:
            shutdown(self._listener)
        with self._lock:
            conns = list(self._conns.values())
        for sock in conns:
            shutdown(sock)
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
        """Protocol-specific ``Endpoint`` fields (field name -> value)."""
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
                    self.counters.inc("accept_errors")
                    log.error("accept failed", protocol=self.protocol, error=str(exc))
                    time.sleep(0.05)
                continue
            conn_id = next(self._conn_ids)
            with self._lock:
                if len(self._conns) - len(self._conn_peers) >= MAX_HANDSHAKING:
                    # Unauthenticated connections (and their threads) are bounded per port.
                    self.counters.inc("connections_over_cap")
                    log.warning("too many unauthenticated connections; closing", peer=f"{addr[0]}:{addr[1]}")
                    sock.close()
                    continue
                self._conns[conn_id] = sock
                self._conn_threads[conn_id] = self._spawn(
                    self._serve, f"conn-{conn_id}", conn_id, sock, f"{addr[0]}:{addr[1]}"
                )

    def _serve(self, conn_id: int, sock: socket.socket, peer: str) -> None:
        reason = "closed"
        try:
            initiator_id = self._handshake(sock, peer)
            with self._lock:
                self._conn_peers[conn_id] = initiator_id
            while True:
                self._dispatch(conn_id, sock, wire.recv_message(sock))
        except ConnectionLostError as exc:
            reason = str(exc)
            if not self._closed.is_set():
                self.counters.inc("connections_lost")
                log.info("initiator connection closed", protocol=self.protocol, peer=peer, reason=reason)
        except (ProtocolError, IncompatiblePeerError, TransferError) as exc:
            reason = str(exc)
            self.counters.inc("connections_refused")
            log.warning("initiator connection refused", protocol=self.protocol, peer=peer, reason=reason)
        finally:
            self._requests.connection_lost(conn_id, reason)
            with self._lock:
                self._conns.pop(conn_id, None)
                self._conn_peers.pop(conn_id, None)
                self._conn_threads.pop(conn_id, None)
            sock.close()

    def _handshake(self, sock: socket.socket, peer: str) -> str:
        kv = self._require_kv()
        # Before the hello is checked: a frame no larger than a hello, within one deadline for
        # the whole handshake (a byte-per-interval drip is cut when it passes).
        deadline = time.monotonic() + self.options.connect_timeout_s
        hello = expect_type(
            wire.recv_message(sock, max_bytes=wire.PRE_AUTH_MAX_BYTES, deadline=deadline), XferHello
        )
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        local = kv.geometry
        if not hmac.compare_digest(hello.access_key.encode(), self._access_key.encode()):
            wire.send_message(
                sock, XferHelloReply(False, "wrong access key: endpoint not from this target", local)
            )
            raise AuthenticationError("wrong access key", peer=peer)
        try:
            check_compatible(kv.geometry, hello.geometry, peer=hello.initiator_id, head_remap=True)
        except (IncompatiblePeerError, KeyError, ValueError, TypeError) as exc:
            wire.send_message(sock, XferHelloReply(False, str(exc), local))
            raise IncompatiblePeerError(str(exc), peer=peer) from None
        wire.send_message(sock, XferHelloReply(True, "", local))
        sock.settimeout(None)
        return str(hello.initiator_id)

    def _dispatch(self, conn_id: int, sock: socket.socket, message: Message) -> None:
        if isinstance(message, LayerWrite):
            self._on_layer_write(conn_id, sock, message)
        elif isinstance(message, RequestBegin):
            try:
                allowed = self._requests.admit(message.req_id, conn_id)
            except UnexpectedBlocksError as exc:
                self.counters.inc("frames_rejected")
                wire.send_message(sock, RequestGrant(message.req_id, False, str(exc), []))
            else:
                self.counters.inc("requests_begun")
                wire.send_message(sock, RequestGrant(message.req_id, True, "", sorted(allowed)))
        elif isinstance(message, RequestAbort):
            self._requests.fail(message.req_id, f"initiator aborted: {message.reason}")
        elif isinstance(message, RequestFinish):
            status = self._requests.finish(
                message.req_id, conn_id, message.num_block_writes, count_writes=self.count_writes
            )
            wire.send_message(sock, RequestResult(message.req_id, status.is_done, status.reason or ""))
        else:
            raise ProtocolError(f"unexpected {message.TAG} frame from an initiator")

    def _refuse(self, sock: socket.socket, req_id: str, exc: TransferError) -> None:
        self.counters.inc("frames_rejected")
        log.warning("frame refused", protocol=self.protocol, req_id=req_id, reason=str(exc))
        wire.send_message(sock, RequestResult(req_id, False, str(exc)))

    def _require_kv(self) -> KVCache:
        if self._kv is None:
            raise NotRegisteredError(f"{self.protocol} target: register(kv_cache) first")
        return self._kv

    def _spawn(self, target: Any, name: str, *args: Any) -> threading.Thread:
        thread = threading.Thread(
            target=target, args=args, name=f"{self.protocol}-target-{name}", daemon=True
        )
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return thread

    def _admit_receive(self, conn_id: int, req_id: str, dst_block_ids: Sequence[int]) -> None:
        """Admit a payload for ``req_id`` and mark this reader as receiving it (one step, under the
        lock ``forget`` takes): a forget either comes first (admit refuses) or waits for the end."""
        with self._receiving_done:
            self._requests.admit(req_id, conn_id, dst_block_ids)
            self._receiving[conn_id] = req_id

    def _end_receive(self, conn_id: int) -> None:
        with self._receiving_done:
            self._receiving.pop(conn_id, None)
            self._receiving_done.notify_all()
