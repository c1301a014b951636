"""IPC transport: P and D on one host; P copies straight into D's KV memory.

Memory:
* CPU: D's KV cache lives in POSIX shared memory (``KVCache(shm_name=...)``); the endpoint names
  the segment, P maps it and views it as a tensor of D's geometry.
* CUDA: D exports its KV buffer as a CUDA IPC handle; P opens it with cupy and views it as a
  torch tensor on its device. Copies are device-to-device on a dedicated stream that first waits
  for an event recorded in ``write_layer`` (so the copy of layer L is ordered after P's compute
  wrote layer L, whatever stream that ran on).

Long runs: one copy per coalesced run per layer moves K and V together (``remote[L, :, d:d+n] <-
local[L, :, s:s+n]``: the kind dimension is a stride of the same view), with no intermediate
buffer. Scattered blocks (short runs): one ``index_select`` + ``index_copy_`` over block rows per
~1 MiB piece (``copy_runs``); a ``copy_`` per 4 KiB run cost ~11 us of dispatch, 0.06 of memcpy.
A layer's pairs reach the copy as numpy columns (``RunArrays``, built once in ``write_layer``), so
no Python object is made per block on either thread (0.87 -> 0.08 ms per 2,048-block layer).

Completion travels over the stream connection (``stream_target.py``) to D's listener: RequestBegin before
the first copy of a request binds it to the connection (so P dying mid-transfer fails it on D) and
is answered by RequestGrant, the blocks D reserved, which P checks before every copy (D cannot
refuse a one-sided copy, so P must not issue a stray one); RequestFinish after the last copy returned (CPU) or after the copy stream synchronised (CUDA).
The socket send happens-after the copies, so when D reads the notice every byte is in place. D
cannot count one-sided copies, so it trusts the ordered notice (``count_writes = False``).
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from splitwise.codes import Protocol
from splitwise.engine.kv_cache import KVCache, KVCacheGeometry
from splitwise.logging import get_logger
from splitwise.transfer import wire
from splitwise.transfer.base import BlockRun, Endpoint, RunArrays
from splitwise.transfer.errors import (
    ConnectionLostError,
    IncompatiblePeerError,
    TransferTimeoutError,
    UnexpectedBlocksError,
    UnsupportedDeviceError,
)
from splitwise.transfer.head_remap import copy_runs_remapped, remap_index
from splitwise.transfer.messages import RequestBegin
from splitwise.transfer.registry import register_transport
from splitwise.transfer.stream_initiator import LayerJob, Peer, StreamInitiator
from splitwise.transfer.stream_target import StreamTarget

log = get_logger("splitwise.transfer")

_FENCE_WAIT_S = 5.0  # bound on forget()'s wait for queued CUDA copies


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise UnsupportedDeviceError(
            f"ipc on CUDA needs cupy (pip install 'splitwise[gpu]'): {exc}"
        ) from None
    return cupy


class IpcTarget(StreamTarget):
    protocol = Protocol.IPC
    count_writes = False

    def _attach_local(self, kv_cache: KVCache) -> None:
        if kv_cache.device.type == "cpu" and kv_cache.shm_name is None:
            raise UnsupportedDeviceError("ipc needs the CPU KV cache in shared memory (--kv-cache-shm)")
        if kv_cache.device.type not in ("cpu", "cuda"):
            raise UnsupportedDeviceError(f"ipc: unsupported device {kv_cache.device}")

    def _endpoint_extra(self, kv_cache: KVCache) -> dict[str, Any]:
        if kv_cache.device.type == "cpu":
            return {"device": "cpu", "shm_name": kv_cache.shm_name or ""}
        # torch's own export gives the handle of the cudaMalloc block AND our offset inside it (the
        # caching allocator may place the KV buffer inside a larger block); cupy opens it on P.
        storage = kv_cache.tensor.untyped_storage()
        _device, handle, _size, storage_offset_bytes, *_ = storage._share_cuda_()  # type: ignore[no-untyped-call]
        offset = int(storage_offset_bytes) + kv_cache.tensor.storage_offset() * kv_cache.tensor.element_size()
        return {"device": "cuda", "cuda_ipc_handle": bytes(handle), "cuda_offset_bytes": offset}


@dataclass
class _Mapping:
    """P's view of D's KV memory. ``close`` drops the tensor before unmapping (BufferError otherwise)."""

    tensor: torch.Tensor | None
    mapped: mmap.mmap | None = None
    cuda_ptr: int | None = None

    def close(self) -> None:
        self.tensor = None
        if self.mapped is not None:
            self.mapped.close()
        if self.cuda_ptr is not None:
            _cupy().cuda.runtime.ipcCloseMemHandle(self.cuda_ptr)


# Runs averaging fewer blocks than this are moved by one gather/scatter instead of one copy_ each.
SHORT_RUN_BLOCKS = 8


def copy_runs(remote: torch.Tensor, local: torch.Tensor, runs: list[BlockRun]) -> None:
    """``remote[:, d:d+n] <- local[:, s:s+n]`` for every run; both are one layer, [2, blocks, ...].

    Short runs go through one vectorised row copy over the [2 * num_blocks, block_bytes] views::

        side     K row of block b     V row of block b
        local    b                    local_blocks + b
        remote   b                    remote_blocks + b

    On CPU that is numpy scatters of byte rows, K then V (``_copy_rows_cpu``), where torch's
    index_select/index_copy_ on uint8 ran at 0.5-1 GB/s and a copy_ per run at 0.06 of memcpy.
    On CUDA: index_select + index_copy_.
    """
    src, dst = _block_ids(runs)
    columns = np.array(runs, dtype=np.int64).reshape(-1, 3).T
    _copy_blocks(remote, local, RunArrays(src, dst, columns[0], columns[1], columns[2]))


def _copy_blocks(remote: torch.Tensor, local: torch.Tensor, arrays: RunArrays) -> None:
    """``copy_runs`` of a layer's pairs, as numpy columns (no Python object per block or run)."""
    src, dst = arrays.src_ids, arrays.dst_ids
    num_runs = len(arrays.lengths)
    if num_runs * SHORT_RUN_BLOCKS <= len(src):
        for s, d, n in zip(
            arrays.src_starts.tolist(), arrays.dst_starts.tolist(), arrays.lengths.tolist(), strict=True
        ):
            remote[:, d : d + n].copy_(local[:, s : s + n], non_blocking=True)
        return
    if local.device.type == "cpu" and remote.device.type == "cpu":
        for kind in range(2):
            _copy_rows_cpu(remote[kind], local[kind], src, dst)
        return
    src_rows = torch.from_numpy(np.concatenate((src, src + local.shape[1]))).to(local.device)
    dst_rows = torch.from_numpy(np.concatenate((dst, dst + remote.shape[1]))).to(remote.device)
    gathered = local.view(2 * local.shape[1], -1).index_select(0, src_rows)
    remote.view(2 * remote.shape[1], -1).index_copy_(0, dst_rows, gathered)


# At most this many source runs (after sorting by source id) are copied one setitem each.
_MAX_SOURCE_RUNS = 64


def _copy_rows_cpu(remote: torch.Tensor, local: torch.Tensor, src: np.ndarray, dst: np.ndarray) -> None:
    """remote[dst[i]] <- local[src[i]] over [blocks, ...] of one kind, as byte rows.

    numpy scatters fast (``remote[idx] = rows``: 13 GB/s, 0.7 of memcpy, for 4 KiB rows) but
    gathers slowly (``local[idx]``: 1.4 GB/s). So pairs are sorted by source id and each run of
    consecutive sources is scattered from a plain view; only a source side fragmented into more
    than ``_MAX_SOURCE_RUNS`` runs falls back to gather + scatter. A row is one numpy ``void``
    element (one memcpy per block instead of a byte loop: 0.20 vs 0.26 ms per 8 MiB of 4 KiB rows).
    """
    remote_bytes = _void_rows(remote)
    local_bytes = _void_rows(local)
    order = np.argsort(src, kind="stable")
    src, dst = src[order], dst[order]
    starts = np.concatenate(([0], np.flatnonzero(np.diff(src) != 1) + 1, [len(src)]))
    if len(starts) - 1 > _MAX_SOURCE_RUNS:
        remote_bytes[dst] = local_bytes[src]
        return
    for first, end in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True):
        remote_bytes[dst[first:end]] = local_bytes[src[first] : src[first] + end - first]


def _void_rows(blocks: torch.Tensor) -> np.ndarray:
    """[num_blocks] numpy void elements, one block's bytes each, over the same memory."""
    rows = blocks.reshape(blocks.shape[0], -1).view(torch.uint8).numpy()
    return rows.view(np.dtype((np.void, rows.shape[1]))).reshape(-1)


def _block_ids(runs: list[BlockRun]) -> tuple[np.ndarray, np.ndarray]:
    """Every source and destination block id of the runs, in order (int64). The runs' columns
    are split by one ``zip`` (C speed; per-run Python was ~1 ms per 2,048-run layer, the time of
    copying those 16 MiB)."""
    if not runs:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    src_starts, dst_starts, lengths = (np.array(column, dtype=np.int64) for column in zip(*runs, strict=True))
    if len(src_starts) == int(lengths.sum()):  # every run is one block
        return src_starts, dst_starts
    offsets = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(src_starts, lengths) + offsets, np.repeat(dst_starts, lengths) + offsets


def _map_shm(name: str, geometry: KVCacheGeometry, peer_id: str) -> _Mapping:
    # Opened as /dev/shm/<name> + mmap rather than multiprocessing.shared_memory: Python < 3.13
    # registers every attached segment with this process's resource tracker, which unlinks it when
    # we exit, so D's KV cache would vanish with P. D owns the segment; we only map it (Linux).
    path = f"/dev/shm/{name.lstrip('/')}"
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise ConnectionLostError(
            f"shared memory {path} not found: peer not on this host, or gone", peer=peer_id
        ) from None
    try:
        size = os.fstat(fd).st_size
        if size < geometry.total_bytes:
            raise IncompatiblePeerError(
                f"shared memory {path} is {size} bytes, geometry needs {geometry.total_bytes}", peer=peer_id
            )
        mapped = mmap.mmap(fd, geometry.total_bytes)
    finally:
        os.close(fd)
    flat = torch.frombuffer(mapped, dtype=torch.uint8, count=geometry.total_bytes)
    return _Mapping(flat.view(geometry.torch_dtype).view(geometry.shape), mapped=mapped)


def _map_cuda(endpoint: Endpoint, geometry: KVCacheGeometry, device: torch.device) -> _Mapping:
    # Opened in P's device context and tagged with P's device: D's memory (on D's GPU, whose index
    # P need not know) is then reached through peer access, which the Lazy flag enables.
    cupy = _cupy()
    index = device.index if device.index is not None else torch.cuda.current_device()
    with cupy.cuda.Device(index):
        base = cupy.cuda.runtime.ipcOpenMemHandle(
            endpoint.cuda_ipc_handle, cupy.cuda.runtime.cudaIpcMemLazyEnablePeerAccess
        )
        nbytes = endpoint.cuda_offset_bytes + geometry.total_bytes
        memory = cupy.cuda.UnownedMemory(base, nbytes, owner=None, device_id=index)
        flat = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0))
        view = torch.as_tensor(flat, device=torch.device("cuda", index))[endpoint.cuda_offset_bytes :]
    return _Mapping(view.view(geometry.torch_dtype).view(geometry.shape), cuda_ptr=int(base))


class IpcInitiator(StreamInitiator):
    protocol = Protocol.IPC
    one_sided = True
    _copy_stream: Any = None
    # CUDA: req_id -> an event recorded on the copy stream after its latest copies. The stream runs
    # in order, so the latest event covers every earlier copy of the request (and of others).
    _copy_fences: dict[str, Any]

    def _attach_local(self, kv_cache: KVCache) -> None:
        self._copy_fences = {}
        self._fence_lock = threading.Lock()
        if kv_cache.device.type == "cuda":
            _cupy()  # fail at register, not at the first request
            self._copy_stream = torch.cuda.Stream(device=kv_cache.device)  # type: ignore[no-untyped-call]
        elif kv_cache.device.type != "cpu":
            raise UnsupportedDeviceError(f"ipc: unsupported device {kv_cache.device}")

    # ---- ordering and fencing around the copies (the copies themselves: _write_layer)

    def _await_ready(self, peer: Peer, job: LayerJob) -> bool:
        if self._copy_stream is None:
            return super()._await_ready(peer, job)  # CPU: the copy runs now, so wait on the host
        if not isinstance(job.ready, torch.cuda.Event):
            # A host-side token on CUDA: wait for it here, then give the copy stream an event that
            # is complete relative to itself (``_write_layer`` orders the copies after job.ready).
            if not super()._await_ready(peer, job):
                return False
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self._copy_stream)
            job.ready = event
        # The copy stream waits for the compute stream's event (stream-ordered; the host does not).
        return not peer.broken.is_set() and self._requests.is_pending(job.req_id)

    def _after_write(self, peer: Peer, job: LayerJob) -> None:
        if self._copy_stream is None:
            return  # CPU copies are synchronous: done when _write_layer returned
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(self._copy_stream)
        with self._fence_lock:
            self._copy_fences[job.req_id] = event

    def _fence(self, req_id: str | None) -> None:
        """Wait for the request's queued CUDA copies to COMPLETE (enqueued is not enough: D may
        reuse the blocks once we acknowledge). Polls with a deadline; never a device synchronize."""
        with self._fence_lock:
            if req_id is None:
                events = list(self._copy_fences.values())
                self._copy_fences.clear()
            else:
                event = self._copy_fences.pop(req_id, None)
                events = [] if event is None else [event]
        deadline = time.monotonic() + _FENCE_WAIT_S
        for event in events:
            while not event.query():
                if time.monotonic() > deadline:
                    self.counters.inc("fence_timeouts")
                    log.error("ipc: queued CUDA copies did not complete in time", req_id=req_id)
                    return
                time.sleep(0.0002)

    def _attach_peer(self, peer_id: str, endpoint: Endpoint, geometry: KVCacheGeometry) -> Any:
        local = self._require_kv()
        if endpoint.device != local.device.type:
            raise IncompatiblePeerError(
                f"peer KV cache is on {endpoint.device}, ours on {local.device.type}", peer=peer_id
            )
        if local.device.type == "cpu":
            return _map_shm(endpoint.shm_name, geometry, peer_id)
        return _map_cuda(endpoint, geometry, local.device)

    def _detach_peer(self, peer: Peer) -> None:
        if peer.attachment is not None:
            peer.attachment.close()

    def _ready_marker(self) -> Any:
        if self._copy_stream is None:
            return None
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()  # on the caller's current stream, right after it wrote the layer
        return event

    def _write_layer(self, peer: Peer, job: LayerJob) -> None:
        allowed = self._grant(peer, job.req_id)
        if not self._requests.is_pending(job.req_id):
            return  # forgotten while we waited for the grant: copy nothing
        dst_ids = job.arrays.dst_ids.tolist()
        stray = [] if allowed.issuperset(dst_ids) else sorted(set(dst_ids) - allowed)
        if stray:
            raise UnexpectedBlocksError(
                "write to blocks not reserved for the request",
                req_id=job.req_id,
                peer=peer.peer_id,
                block_ids=stray,
            )
        kv = self._require_kv()
        local = kv.tensor[job.layer]
        remote = peer.attachment.tensor[job.layer]
        index = remap_index(kv.geometry, peer.geometry)  # different TP replicas (#14): CPU only
        if index is not None:
            copy_runs_remapped(remote, local, job.runs, index)
            return
        if self._copy_stream is None:
            _copy_blocks(remote, local, job.arrays)
            return
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(job.ready)
            _copy_blocks(remote, local, job.arrays)

    def _grant(self, peer: Peer, req_id: str) -> frozenset[int]:
        """The blocks D reserved for ``req_id``: asked once per request (one round trip on this
        sender thread, never on P's compute thread), then checked before every copy, because a
        one-sided copy cannot be refused by D once issued."""
        with peer.grant_arrived:
            grant = peer.grants.get(req_id)
        if grant is None:
            with peer.grant_arrived:
                peer.unanswered[req_id] = peer.unanswered.get(req_id, 0) + 1  # see Peer.stale
            wire.send_message(peer.sock, RequestBegin(req_id))
            deadline = time.monotonic() + self.options.connect_timeout_s
            with peer.grant_arrived:
                while req_id not in peer.grants and not peer.broken.is_set():
                    if not self._requests.is_pending(req_id):
                        return frozenset()  # forgotten meanwhile (forget notifies): copy nothing
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TransferTimeoutError(
                            "no grant from the target", req_id=req_id, peer=peer.peer_id
                        )
                    peer.grant_arrived.wait(left)
                grant = peer.grants.get(req_id)
            if grant is None:
                raise ConnectionLostError(
                    "connection lost waiting for the grant", req_id=req_id, peer=peer.peer_id
                )
        if not grant.ok:
            raise UnexpectedBlocksError(
                f"target refused the request: {grant.reason}", req_id=req_id, peer=peer.peer_id
            )
        return frozenset(grant.dst_block_ids)

    def _before_finish(self, peer: Peer, req_id: str) -> None:
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        with self._fence_lock:
            self._copy_fences.pop(req_id, None)  # complete: the stream synchronised


register_transport("ipc", IpcInitiator, IpcTarget)
