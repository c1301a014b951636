"""TCP transport: KV blocks between hosts without RDMA, landing straight in D's blocks.

Per ``write_layer`` P sends ONE frame: a LayerWrite header listing the destination runs, then the
raw bytes of those runs, K first then V, gathered by ``sendmsg`` from memoryviews of P's KV buffer::

    [len][LayerWrite{req_id, layer, runs=[[d0, n0], [d1, n1]]}][K d0..d0+n0][K d1..][V d0..][V d1..]

D's reader thread checks the header against the request's expected blocks, then ``recv_into``s
each run directly at ``geometry.block_offset(layer, kind, d)`` of its KV buffer (no staging). A
header naming blocks D did not reserve for that request is refused: the payload is read into a
scratch buffer and dropped, the request fails on both sides. Completion: P's RequestFinish, on
the same ordered stream after every LayerWrite, carries the number of block writes; D answers
RequestResult(ok) only when that number equals what landed.

A CUDA KV cache goes through a pinned host buffer per transport thread (``tcp_staging``): P
gathers a layer's runs device -> host after the layer's ready token, D scatters them host ->
device; the wire format is the same. (Same-host GPUs normally use ipc, cross-host GPUs rdma.)
"""

from __future__ import annotations

import socket

from splitwise.codes import Protocol
from splitwise.engine.kv_cache import KIND_K, KIND_V, KVCache, KVCacheGeometry
from splitwise.transfer import wire
from splitwise.transfer.errors import UnexpectedBlocksError, UnsupportedDeviceError
from splitwise.transfer.head_remap import gather_remapped, remap_index
from splitwise.transfer.messages import LayerWrite
from splitwise.transfer.registry import register_transport
from splitwise.transfer.stream_initiator import LayerJob, Peer, StreamInitiator
from splitwise.transfer.stream_target import StreamTarget
from splitwise.transfer.tcp_staging import DeviceStage


def _byte_view(kv_cache: KVCache) -> memoryview:
    if kv_cache.device.type != "cpu":
        raise UnsupportedDeviceError(f"tcp transport needs a CPU KV cache, got {kv_cache.device}")
    return memoryview(kv_cache.as_bytes().numpy()).cast("B")  # type: ignore[arg-type]


def _run_views(
    buffer: memoryview, geometry: KVCacheGeometry, layer: int, runs: list[list[int]]
) -> list[memoryview]:
    """Views of [start, start + n) blocks of ``layer``: K of every run, then V of every run.

    Offsets computed here rather than with ``geometry.block_offset`` per run: that recomputes the
    dtype size with a torch call, which for 4 KiB blocks cost more than moving the bytes. Runs that
    follow each other on this side (P's fresh blocks are often consecutive while D's are not) are
    merged into one view: the byte stream is the same, with one iovec instead of one per block.
    """
    block_bytes = geometry.bytes_per_block
    merged: list[list[int]] = []
    for start, n in runs:
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1][1] += n
        else:
            merged.append([start, n])
    views = []
    for kind in (KIND_K, KIND_V):
        region = geometry.region_offset(layer, kind)
        for start, n in merged:
            offset = region + start * block_bytes
            views.append(buffer[offset : offset + n * block_bytes])
    return views


def _attach(kv_cache: KVCache) -> tuple[memoryview | None, DeviceStage | None]:
    """CPU: a byte view of the KV buffer; CUDA: a host staging area for it."""
    if kv_cache.device.type == "cuda":
        return None, DeviceStage(kv_cache)
    return _byte_view(kv_cache), None


class _TcpLocal:
    """Both tcp sides see their own cache the same way: a byte view on CPU, a staging area on CUDA."""

    _stage: DeviceStage | None = None
    _bytes: memoryview

    def _attach_local(self, kv_cache: KVCache) -> None:
        view, self._stage = _attach(kv_cache)
        if view is not None:
            self._bytes = view


class TcpTarget(_TcpLocal, StreamTarget):
    protocol = Protocol.TCP

    def _detach_local(self) -> None:
        if self._stage is None:
            self._bytes.release()

    def _receive(self, sock: socket.socket, geometry: KVCacheGeometry, header: LayerWrite) -> None:
        """The payload straight into the blocks (CPU), or through the staging area (CUDA)."""
        if self._stage is None:
            wire.recv_into_buffers(sock, _run_views(self._bytes, geometry, header.layer, header.runs))
            return
        wire.recv_into_buffers(sock, [self._stage.receive_buffer(header.payload_bytes)])
        self._stage.scatter(header.layer, header.runs)

    def _on_layer_write(self, conn_id: int, sock: socket.socket, header: LayerWrite) -> None:
        geometry = self._require_kv().geometry
        block_bytes = geometry.bytes_per_block
        num_blocks = sum(n for _, n in header.runs) if all(len(r) == 2 for r in header.runs) else -1
        dst_block_ids = [d + i for d, n in header.runs for i in range(n)] if num_blocks > 0 else []
        try:
            if num_blocks <= 0 or any(n <= 0 for _, n in header.runs):
                raise UnexpectedBlocksError(f"malformed runs {header.runs[:8]}", req_id=header.req_id)
            if not 0 <= header.layer < geometry.num_layers:
                raise UnexpectedBlocksError(f"layer {header.layer} out of range", req_id=header.req_id)
            if header.payload_bytes != 2 * num_blocks * block_bytes:
                raise UnexpectedBlocksError(
                    f"payload {header.payload_bytes} bytes != 2 x {num_blocks} blocks x {block_bytes}",
                    req_id=header.req_id,
                )
            self._admit_receive(conn_id, header.req_id, dst_block_ids)  # forget() waits for the end
        except UnexpectedBlocksError as exc:
            wire.discard(sock, header.payload_bytes)
            self._refuse(sock, header.req_id, exc)
            return
        try:
            self._receive(sock, geometry, header)
        finally:
            self._end_receive(conn_id)
        self._requests.landed(header.req_id, num_blocks)
        self.counters.inc("bytes_received", header.payload_bytes)


class TcpInitiator(_TcpLocal, StreamInitiator):
    protocol = Protocol.TCP

    def _write_layer(self, peer: Peer, job: LayerJob) -> None:
        if self._stage is not None:  # CUDA KV: through host staging (the token was waited for)
            self._write_layer_staged(peer, job)
            return
        kv = self._require_kv()
        geometry = kv.geometry
        num_blocks = sum(run.num_blocks for run in job.runs)
        header = LayerWrite(
            job.req_id,
            job.layer,
            [[run.dst_start, run.num_blocks] for run in job.runs],
            2 * num_blocks * peer.geometry.bytes_per_block,  # D's layout (differs when heads remap)
        )
        runs = [[run.src_start, run.num_blocks] for run in job.runs]
        index = remap_index(geometry, peer.geometry)  # different TP replicas (#14)
        if index is None:
            payload = _run_views(self._bytes, geometry, job.layer, runs)
        else:
            payload = gather_remapped(kv.tensor[job.layer], runs, index)
        wire.send_buffers(peer.sock, [wire.frame_bytes(header), *payload])
        self.counters.inc("bytes_sent", header.payload_bytes)

    def _write_layer_staged(self, peer: Peer, job: LayerJob) -> None:
        assert self._stage is not None
        geometry = self._require_kv().geometry
        num_blocks = sum(run.num_blocks for run in job.runs)
        header = LayerWrite(
            job.req_id,
            job.layer,
            [[run.dst_start, run.num_blocks] for run in job.runs],
            2 * num_blocks * geometry.bytes_per_block,
        )
        payload = self._stage.gather(job.layer, [[run.src_start, run.num_blocks] for run in job.runs])
        wire.send_buffers(peer.sock, [wire.frame_bytes(header), payload])
        self.counters.inc("bytes_sent", header.payload_bytes)


register_transport("tcp", TcpInitiator, TcpTarget)
