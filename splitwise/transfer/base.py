"""The Transport contract: how P's KV blocks land in D's KV blocks, layer by layer.

Map of the two sides (P = prefill node = initiator/sender, D = decode node = target/receiver)::

    step  D (TransportTarget)                     P (TransportInitiator)
    ----  --------------------------------------  ------------------------------------------------
    0     register(kv_cache)         once          register(kv_cache)                     once
    1     endpoint() -> Endpoint  -- control channel -> connect(peer_id, endpoint)  once per peer, reused
    2     expect(req_id, dst_block_ids, timeout_s)            (before D tells P about the request)
    3                                              write_layer(peer_id, req_id, layer, src, dst,
                                                               ready)                  per layer
    4                                              finish(peer_id, req_id)        after the last layer
    5     poll(req_id) -> DONE | FAILED | PENDING  poll(req_id) / wait(req_id, timeout_s)
    6     forget(req_id)                           forget(req_id)   returns once nothing more can land
    -     revoke(peer_id) -> fenced?               abort_peer(peer_id, reason)   (fencing, below)
    7     close()                                  close()

Guarantees every transport gives:

* D's ``poll`` says DONE only after every write P issued for the request before ``finish`` has
  fully landed in D's memory, and P announced (in the finish notice) exactly the writes D counted.
* Writes land straight in the destination blocks (no staging copy on D) and only in blocks that
  D passed to ``expect`` for that request. A write outside them fails the request on both sides;
  it never lands elsewhere.
* P's ``poll`` says DONE only after D acknowledged the request as landed; P may then free (or
  reuse) its source blocks. FAILED on either side is final and carries a reason.
* A dead peer or a broken connection turns the affected PENDING requests to FAILED (never a hang,
  never DONE); a request D expects that never starts fails when its ``timeout_s`` passes.

Ordering rule (stream-ordered sends). ``write_layer`` takes the producer's ready token for the
layer (``splitwise.engine.layer_ready``: a ``torch.cuda.Event`` recorded on the compute stream after
the layer's KV write; ``COMPLETED`` on CPU). No transport reads source memory for that write (RDMA
WRITE posted, copy enqueued, bytes sent) before the token has completed: it waits on its own
thread (polling ``query()``) or orders a copy stream after the event (``wait_event``); it never
synchronises the whole device, and never blocks the caller. ``ready=None`` means the memory is
valid now (the caller synchronised, or it is CPU memory written by this thread).

Fencing (lease safety). D must never hand a block to another request while a write into it can
still land. The primitives, used by the P/D flows around a cancel or a timeout:

* P: ``forget(req_id)`` stops posting for the request and returns only when none of its writes
  can still land (queued jobs skipped, a running copy/post finished, RDMA WRITEs completed or
  flushed, CUDA copies completed, not merely enqueued). P acknowledges D's cancel after it.
* P: ``abort_peer(peer_id, reason)`` does the same for every request to ``peer_id`` and fails them:
  called when P's control connection to that D drops.
* D: ``revoke(peer_id)`` cuts ``peer_id``'s access when it did not acknowledge in time (rdma: its
  QPs to ERROR; tcp: connection shut and its reader joined; ipc: connection shut and P's hang-up
  awaited). True means nothing more from that peer can land; False means the transport could not
  confirm it (ipc with a wedged P): D must then quarantine the blocks instead of reusing them.

Threading: every method is thread-safe. Transports run their own I/O threads; no method blocks
for long except ``connect`` (one network handshake) and ``wait``. Block ids are block indices of
the (layer, kind) regions of ``splitwise.engine.kv_cache.KVCache``; every layer uses the same
block ids, and K and V move together. Implementations take one constructor argument,
``options: TransportOptions``, and register with ``splitwise.transfer.registry.register_transport``.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from splitwise.codes import Protocol
from splitwise.counters import Counters
from splitwise.endpoint import Endpoint as Endpoint  # torch-free: the scheduler carries it too
from splitwise.engine.kv_cache import KVCache, KVCacheGeometry

# Re-exported: transports and flows take the ready-token types from here.
from splitwise.engine.layer_ready import COMPLETED as COMPLETED
from splitwise.engine.layer_ready import ReadyToken as ReadyToken
from splitwise.transfer.errors import IncompatiblePeerError, InvalidBlockIdsError


class TransferState(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class TransferStatus:
    """What ``poll`` returns. ``reason`` is set exactly when ``state`` is FAILED."""

    state: TransferState
    reason: str | None = None

    @property
    def is_done(self) -> bool:
        return self.state is TransferState.DONE

    @property
    def is_failed(self) -> bool:
        return self.state is TransferState.FAILED

    @property
    def is_finished(self) -> bool:
        return self.state is not TransferState.PENDING


PENDING = TransferStatus(TransferState.PENDING)
DONE = TransferStatus(TransferState.DONE)


def failed(reason: str) -> TransferStatus:
    return TransferStatus(TransferState.FAILED, reason)


@dataclass(frozen=True)
class TransportOptions:
    """Knobs shared by every transport. ``host``/``port`` are where a target listens (port 0 = any
    free port) and the address it advertises; protocol-specific values go in ``extra``."""

    host: str = "127.0.0.1"
    port: int = 0
    connect_timeout_s: float = 10.0
    extra: Mapping[str, str] = field(default_factory=dict)
    # Who we are to peers (the control channel's node id), and the cluster token transports that
    # run their own side channel (rdma) authenticate it with, as the control channel does.
    node_id: str = ""
    cluster_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"transfer port: {self.port} is not in 0..65535")
        if self.connect_timeout_s <= 0:
            raise ValueError(f"transfer connect timeout: {self.connect_timeout_s} must be > 0")


# The transfer package's counters are the project's one counter type (``inc`` / ``get`` / ``snapshot``).
TransferCounters = Counters


# --------------------------------------------------------------------------- ready tokens


def wait_ready(
    token: ReadyToken | None,
    *,
    is_cancelled: Callable[[], bool],
    sleep: Callable[[float], None] = time.sleep,
    max_delay_s: float = 0.0005,
) -> bool:
    """Block the calling (transport) thread until ``token`` completed: True; False as soon as
    ``is_cancelled()`` says the write is no longer wanted. Polls with a short back-off, so the
    wait never holds the device or the caller, and a cancel interrupts it."""
    if token is None or token is COMPLETED:
        return not is_cancelled()
    delay = 0.00002
    while not token.query():
        if is_cancelled():
            return False
        sleep(delay)
        delay = min(delay * 2, max_delay_s)
    return not is_cancelled()


# --------------------------------------------------------------------------- block runs


class BlockRun(NamedTuple):
    """``num_blocks`` consecutive blocks: src_start.. on P map to dst_start.. on D."""

    src_start: int
    dst_start: int
    num_blocks: int


class RunArrays(NamedTuple):
    """The runs of a list of (src, dst) block pairs as numpy int64 columns, with the pairs
    themselves: what vectorised copies need, without a Python object per run."""

    src_ids: np.ndarray  # [pairs] every source block id, in pair order
    dst_ids: np.ndarray  # [pairs] every destination block id
    src_starts: np.ndarray  # [runs] first source block of each run
    dst_starts: np.ndarray  # [runs]
    lengths: np.ndarray  # [runs] blocks per run

    def runs(self) -> list[BlockRun]:
        return [
            BlockRun(s, d, n)
            for s, d, n in zip(
                self.src_starts.tolist(), self.dst_starts.tolist(), self.lengths.tolist(), strict=True
            )
        ]


def coalesce_runs(src_block_ids: Sequence[int], dst_block_ids: Sequence[int]) -> list[BlockRun]:
    """Merge (src, dst) pairs into runs where both sides are consecutive, keeping pair order.

    ======================  ======================  ==========================
    src_block_ids           dst_block_ids           runs (src, dst, n)
    ======================  ======================  ==========================
    [4, 5, 6]               [10, 11, 12]            [(4, 10, 3)]
    [4, 5, 6]               [10, 11, 20]            [(4, 10, 2), (6, 20, 1)]
    [4, 6, 7]               [10, 11, 12]            [(4, 10, 1), (6, 11, 2)]
    [7, 6]                  [1, 2]                  [(7, 1, 1), (6, 2, 1)]
    ======================  ======================  ==========================

    One run is one contiguous byte range per (layer, kind) region on each side, so a transport
    issues one copy / one iovec / one RDMA WRITE per run instead of per block.
    """
    return coalesce_arrays(src_block_ids, dst_block_ids).runs()


def coalesce_arrays(
    src_block_ids: Sequence[int] | np.ndarray, dst_block_ids: Sequence[int] | np.ndarray
) -> RunArrays:
    """``coalesce_runs`` as numpy columns (vectorised: a layer of 4 KiB blocks has thousands of
    pairs, ~3 us each in Python, and a BlockRun per run costs ~0.25 us more)."""
    if len(src_block_ids) != len(dst_block_ids):
        raise InvalidBlockIdsError(
            f"{len(src_block_ids)} source blocks but {len(dst_block_ids)} destination blocks",
            block_ids=list(dst_block_ids),
        )
    src = np.asarray(src_block_ids, dtype=np.int64)
    dst = np.asarray(dst_block_ids, dtype=np.int64)
    negative = np.flatnonzero((src < 0) | (dst < 0))
    if negative.size:
        pair = [int(src[negative[0]]), int(dst[negative[0]])]
        raise InvalidBlockIdsError(f"negative block id in pair ({pair[0]}, {pair[1]})", block_ids=pair)
    if not src.size:
        return RunArrays(src, dst, src, dst, src)
    starts = np.concatenate(([0], np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1))
    lengths = np.diff(np.concatenate((starts, [src.size])))
    return RunArrays(src, dst, src[starts], dst[starts], lengths)


def check_block_ids(
    block_ids: Sequence[int] | np.ndarray, num_blocks: int, *, side: str, req_id: str | None = None
) -> None:
    """Raise InvalidBlockIdsError unless every id is in [0, num_blocks) and none repeats."""
    ids = np.asarray(block_ids, dtype=np.int64)
    bad = ids[(ids < 0) | (ids >= num_blocks)]
    if bad.size:
        raise InvalidBlockIdsError(
            f"{side} block ids out of range [0, {num_blocks})", req_id=req_id, block_ids=bad.tolist()
        )
    # O(n) when the cache is not much larger than the list (a layer's thousands of 4 KiB blocks:
    # 0.02 vs 0.1 ms for np.unique's sort), else sort.
    if num_blocks <= 64 * ids.size:
        repeats = np.bincount(ids, minlength=0).max(initial=0) > 1
    else:
        repeats = np.unique(ids).size != ids.size
    if repeats:
        raise InvalidBlockIdsError(f"{side} block ids repeat", req_id=req_id, block_ids=ids.tolist())


# --------------------------------------------------------------------------- geometry


def check_compatible(
    local: KVCacheGeometry, remote: KVCacheGeometry, *, peer: str | None = None, head_remap: bool = False
) -> None:
    """Raise IncompatiblePeerError naming every field that differs (num_blocks may differ).
    ``head_remap``: this transport can move KV between buffers holding different numbers of head
    replicas (tensor parallelism, #14); without it those must hold the same heads."""
    if local.compatible_with(remote):
        if local.needs_head_remap(remote) and not head_remap:
            raise IncompatiblePeerError(
                f"KV buffers hold {local.num_kv_heads} and {remote.num_kv_heads} head replicas "
                "(different tensor-parallel sizes); this transport cannot remap heads",
                peer=peer,
            )
        return
    diffs = [
        f"{name} {getattr(local, name)} != {getattr(remote, name)}"
        for name in local.COMPAT_FIELDS
        if getattr(local, name) != getattr(remote, name)
    ]
    raise IncompatiblePeerError(f"KV geometry mismatch (local != peer): {'; '.join(diffs)}", peer=peer)


# --------------------------------------------------------------------------- the contract


class TransportTarget(abc.ABC):
    """D's side: owns the destination KV memory and says when a request's blocks have landed."""

    protocol: Protocol  # registry name, e.g. Protocol.TCP

    @abc.abstractmethod
    def register(self, kv_cache: KVCache) -> None:
        """Called once by D at start-up, before ``endpoint``. Exposes ``kv_cache`` to peers (maps it,
        starts listeners). D keeps owning ``kv_cache`` and must keep it alive until ``close``."""

    @abc.abstractmethod
    def endpoint(self) -> Endpoint:
        """Addressing a peer needs for ``TransportInitiator.connect`` (host/port, shm name, IPC handle,
        RDMA schema) plus this side's geometry and any access key, as one typed ``Endpoint``. Hand it out only to
        authenticated peers (control channel, cluster registry). Non-blocking; valid until ``close``."""

    @abc.abstractmethod
    def expect(self, req_id: str, dst_block_ids: Sequence[int], timeout_s: float | None = None) -> None:
        """Called by D after reserving ``dst_block_ids`` and BEFORE sending the request to P. Only
        these blocks may be written for ``req_id``. With ``timeout_s`` the request turns FAILED if not
        DONE by then. Non-blocking. Raises InvalidBlockIdsError (bad ids) or TransferError (req_id
        already expected)."""

    @abc.abstractmethod
    def poll(self, req_id: str) -> TransferStatus:
        """Non-blocking. DONE: every layer of every block P wrote has landed and P's finish notice
        matched. Unknown (or forgotten) req_id: FAILED with a reason."""

    @abc.abstractmethod
    def forget(self, req_id: str) -> None:
        """Drop the request's state (after DONE/FAILED, or to cancel). Later writes for it are refused
        where the transport can refuse them (a tcp frame being received for it is waited for); with
        one-sided writes (ipc, rdma) an in-flight copy may still land, so D must not hand the blocks
        to another request until P acknowledged the cancel (P's ``forget`` returned) or ``revoke``
        returned True. Idempotent; waits only for a receive already under way."""

    @abc.abstractmethod
    def revoke(self, peer_id: str) -> bool:
        """Cut the access of initiator ``peer_id`` (its ``TransportOptions.node_id``): its requests
        turn FAILED, and once this returns True nothing it wrote or posted can land any more. False:
        the transport could not confirm that within ``connect_timeout_s``; keep the blocks out of use.
        A later ``connect`` from that peer is a new handshake. Blocks for at most that timeout."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop listeners and I/O threads; PENDING requests turn FAILED. Idempotent."""

    counters: TransferCounters


class TransportInitiator(abc.ABC):
    """P's side: pushes its KV blocks into a peer's reserved blocks and learns when they landed."""

    protocol: Protocol

    @abc.abstractmethod
    def register(self, kv_cache: KVCache) -> None:
        """Called once by P at start-up. P keeps owning ``kv_cache``; the transport reads it in place
        from its own threads, so P must not overwrite a request's source blocks before ``poll`` says
        DONE/FAILED for it."""

    @abc.abstractmethod
    def connect(self, peer_id: str, endpoint: Endpoint) -> None:
        """Open (or reuse) the connection to the target that published ``endpoint``. Blocks for one
        handshake (up to ``TransportOptions.connect_timeout_s``). Calling it again for a connected
        peer is a no-op; for a broken one it reconnects. Raises ConnectionLostError,
        IncompatiblePeerError (geometry/schema mismatch)."""

    @abc.abstractmethod
    def write_layer(
        self,
        peer_id: str,
        req_id: str,
        layer: int,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
        ready: ReadyToken | None = None,
    ) -> None:
        """Called from P's per-layer callback right after layer ``layer``'s K and V are issued for
        these blocks, with the layer's ready token (the ordering rule above: nothing of these blocks
        is read before ``ready`` completed). Validates, enqueues and returns (no network round trip,
        no wait for ``ready``; copies/sends run on the transport's thread in call order). A failure shows up in ``poll``; raises only for caller
        errors (NotConnectedError, InvalidBlockIdsError, NotRegisteredError), and then the request
        also turns FAILED on both sides: a layer that was not shipped can never end up DONE.
        A block may be written more than once (chunked prefill rewrites a partly filled block)."""

    @abc.abstractmethod
    def finish(self, peer_id: str, req_id: str) -> None:
        """Called after the last ``write_layer`` of ``req_id``: queues the completion notice, ordered
        after every write of the request. Non-blocking."""

    @abc.abstractmethod
    def poll(self, req_id: str) -> TransferStatus:
        """Non-blocking. DONE once the target acknowledged the request as landed; FAILED on any
        error (connection lost, target refused a write). Unknown req_id: FAILED."""

    @abc.abstractmethod
    def wait(self, req_id: str, timeout_s: float) -> TransferStatus:
        """Block up to ``timeout_s`` for DONE/FAILED; returns PENDING on timeout (the caller decides)."""

    @abc.abstractmethod
    def forget(self, req_id: str) -> None:
        """Drop the request's state and fence it: queued writes are skipped, and this returns only
        when none of its writes can still land on the peer (a running copy finished, posted RDMA
        WRITEs completed or flushed, CUDA copies completed). Bounded by the transport's completion
        timeout; past it the peer's connection is broken, which ends its writes too. Idempotent."""

    @abc.abstractmethod
    def abort_peer(self, peer_id: str, reason: str) -> None:
        """P lost its control connection to ``peer_id``: stop posting to it, fail its PENDING
        requests, and return once none of their writes can still land (as ``forget``). The next
        ``connect`` to that peer makes a fresh connection."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close connections and stop threads; PENDING requests turn FAILED. Idempotent."""

    counters: TransferCounters
