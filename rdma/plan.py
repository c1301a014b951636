"""Block runs -> RDMA WRITE work requests: addresses, message-size splits, striping and batches.

Addresses (one KV buffer per side, the layout of ``splitwise.engine.kv_cache``)::

    local_addr(L, kind, run)  = local_base  + geometry.block_offset(L, kind, run.src_start)
    remote_addr(L, kind, run) = remote_base + geometry.block_offset(L, kind, run.dst_start)
    length(run)               = run.num_blocks * geometry.bytes_per_block

One run (blocks consecutive on BOTH sides, ``splitwise.transfer.base.coalesce_runs``) is one byte
range per (layer, kind) on each side, so it becomes one WRITE unless it exceeds the port's max
message size; then it is split at block boundaries (or in max-size pieces if one block is larger).

Batches: a batch is posted as one chain; only its last WR is signaled (fewer completions to poll),
and a batch never holds more WRs than the send queue has slots, so ``SendQueueSlots`` can always
free them all with that one completion.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rdma.verbs import WorkRequest
from splitwise.engine.kv_cache import KIND_K, KIND_V, KVCacheGeometry
from splitwise.engine.parallel.layout import head_map
from splitwise.transfer.base import BlockRun


@dataclass(frozen=True)
class WriteOp:
    """One contiguous copy: ``length`` bytes from local ``local_addr`` to remote ``remote_addr``."""

    local_addr: int
    remote_addr: int
    length: int


def max_chunk_bytes(bytes_per_block: int, max_msg_bytes: int) -> int:
    """The largest WRITE size to use: whole blocks when a block fits in one message."""
    if max_msg_bytes <= 0:
        raise ValueError(f"max message size must be > 0, got {max_msg_bytes}")
    if bytes_per_block <= max_msg_bytes:
        return (max_msg_bytes // bytes_per_block) * bytes_per_block
    return max_msg_bytes


def split(op: WriteOp, chunk_bytes: int) -> list[WriteOp]:
    return [
        WriteOp(op.local_addr + start, op.remote_addr + start, min(chunk_bytes, op.length - start))
        for start in range(0, op.length, chunk_bytes)
    ]


def plan_layer(
    geometry: KVCacheGeometry,
    layer: int,
    runs: Sequence[BlockRun],
    *,
    local_base: int,
    remote_base: int,
    max_msg_bytes: int,
) -> list[WriteOp]:
    """The WRITEs that move ``runs`` of layer ``layer``: every run's K, then every run's V."""
    if not 0 <= layer < geometry.num_layers:
        raise ValueError(f"layer {layer} is not in [0, {geometry.num_layers})")
    chunk = max_chunk_bytes(geometry.bytes_per_block, max_msg_bytes)
    ops: list[WriteOp] = []
    for kind in (KIND_K, KIND_V):
        for run in runs:
            whole = WriteOp(
                local_addr=local_base + geometry.block_offset(layer, kind, run.src_start),
                remote_addr=remote_base + geometry.block_offset(layer, kind, run.dst_start),
                length=run.num_blocks * geometry.bytes_per_block,
            )
            ops.extend(split(whole, chunk))
    return ops


def plan_layer_remapped(
    local: KVCacheGeometry,
    remote: KVCacheGeometry,
    layer: int,
    runs: Sequence[BlockRun],
    *,
    max_msg_bytes: int,
) -> list[WriteOp]:
    """The WRITEs of ``plan_layer`` between buffers holding different numbers of head replicas
    (tensor parallelism, #14): D's head q of each block comes from P's head ``head_map[q]``.

    Blocks are head-major (``engine.kv_cache``): head h is the [block_size, head_dim] slab at
    h * slab_bytes inside its block, so each destination block gets one WRITE per group of
    destination heads whose source heads are consecutive too::

        local_addr  = local.block_offset(L, kind, src_block)  + head_map[q0] * slab_bytes
        remote_addr = remote.block_offset(L, kind, dst_block) + q0 * slab_bytes
        length      = (q1 - q0) * slab_bytes            for the group of heads [q0, q1)

        1 model head, P tp=2 [h0 h0'] -> D tp=1 [h0]:     head_map [0]     1 WRITE per block
                      P tp=1 [h0]     -> D tp=2 [h0 h0]:  head_map [0, 0]  2 WRITEs per block

    Offsets are relative to each buffer's base (``to_work_requests`` places them).
    """
    if not 0 <= layer < local.num_layers:
        raise ValueError(f"layer {layer} is not in [0, {local.num_layers})")
    mapping = head_map(local.logical_kv_heads, local.num_kv_heads, remote.num_kv_heads)
    slab = local.block_size * local.head_dim * local.itemsize
    groups: list[tuple[int, int, int]] = []  # (first dst head, first src head, heads)
    for q, h in enumerate(mapping):
        if groups and groups[-1][0] + groups[-1][2] == q and groups[-1][1] + groups[-1][2] == h:
            groups[-1] = (groups[-1][0], groups[-1][1], groups[-1][2] + 1)
        else:
            groups.append((q, h, 1))
    chunk = max_chunk_bytes(slab, max_msg_bytes)
    ops: list[WriteOp] = []
    for kind in (KIND_K, KIND_V):
        for run in runs:
            for i in range(run.num_blocks):
                src = local.block_offset(layer, kind, run.src_start + i)
                dst = remote.block_offset(layer, kind, run.dst_start + i)
                for dst_head, src_head, num_heads in groups:
                    whole = WriteOp(src + src_head * slab, dst + dst_head * slab, num_heads * slab)
                    ops.extend(split(whole, chunk))
    return ops


def stripe(ops: Sequence[WriteOp], num_lanes: int) -> list[list[WriteOp]]:
    """Spread ``ops`` over ``num_lanes`` QPs (one per NIC), balancing bytes; deterministic.

    Each op goes to the lane with the fewest bytes so far (lowest index on ties), keeping order
    within a lane. Correctness does not depend on the split: every lane ends with its own
    completion notice, and D waits for all of them.
    """
    if num_lanes < 1:
        raise ValueError(f"num_lanes must be >= 1, got {num_lanes}")
    lanes: list[list[WriteOp]] = [[] for _ in range(num_lanes)]
    loads = [0] * num_lanes
    for op in ops:
        index = loads.index(min(loads))
        lanes[index].append(op)
        loads[index] += op.length
    return lanes


def to_work_requests(
    ops: Iterable[WriteOp], *, local_base: int, lkey: int, remote_base: int, rkey: int, first_wr_id: int
) -> list[WorkRequest]:
    """Unsignaled WRITEs with consecutive wr_ids; ``batches`` decides which ones get signaled.

    ``ops`` may be planned relative to 0 and placed here: each NIC registers the same memory under
    its own keys (and, for GPU memory, possibly its own MR address space), so one plan serves all.
    """
    return [
        WorkRequest(
            wr_id=first_wr_id + i,
            local_addr=local_base + op.local_addr,
            length=op.length,
            lkey=lkey,
            remote_addr=remote_base + op.remote_addr,
            rkey=rkey,
        )
        for i, op in enumerate(ops)
    ]


def batches(wrs: Sequence[WorkRequest], *, max_batch: int) -> list[list[WorkRequest]]:
    """Cut ``wrs`` into chains of at most ``max_batch`` WRs, the last of each chain signaled.

    ``max_batch`` must not exceed the send-queue depth: the signaled WR is what frees the slots of
    the unsignaled ones before it.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    out: list[list[WorkRequest]] = []
    for start in range(0, len(wrs), max_batch):
        chunk = list(wrs[start : start + max_batch])
        last = chunk[-1]
        chunk[-1] = WorkRequest(
            last.wr_id,
            last.local_addr,
            last.length,
            last.lkey,
            last.remote_addr,
            last.rkey,
            True,
            last.imm_data,
        )
        out.append(chunk)
    return out
