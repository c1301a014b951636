"""KVGeometry: the one description of a KV cache's layout, used by the engine, the scheduler's
node records, the P<->D control channel and every transport (torch-free, so the scheduler and
simulated nodes can carry it without importing torch).

Two nodes may exchange KV blocks iff their ``compat_key``s are equal: every layout field except
``num_blocks`` (each node sizes its own cache), with the model's KV heads rather than the buffer's:
instances of different tensor-parallel sizes pair, and where their buffers hold a different
number of head replicas (``needs_head_remap``) the transport remaps heads (engine.parallel.layout).
Byte layout of one cache (``shape``; the order inside a block is the engine's own, head-major:
``engine.kv_cache``)::

    [num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]

    region (layer, kind)   = num_blocks * bytes_per_block bytes, at (layer * 2 + kind) * bytes_per_region
    block b of a region    = bytes_per_block bytes, at region_offset + b * bytes_per_block
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes per element of each --dtype


@dataclass(frozen=True)
class KVGeometry:
    dtype: str  # a --dtype name (splitwise.engine.config.DTYPES)
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int = 0  # this cache's size; 0 where only the layout matters (a registry record)
    # Tensor parallelism (#14): the instance's ranks, and the model's KV heads when
    # num_kv_heads counts per-rank replicas (tp > model heads); 0 = num_kv_heads. Neither is in
    # the compat key: an instance's buffer holds every head whatever its TP (engine.parallel.layout).
    tp_size: int = 1
    model_kv_heads: int = 0

    COMPAT_FIELDS: ClassVar[tuple[str, ...]] = (
        "dtype",
        "block_size",
        "num_layers",
        "logical_kv_heads",
        "head_dim",
    )

    @property
    def compat_key(self) -> tuple[str, int, int, int, int]:
        return (self.dtype, self.block_size, self.num_layers, self.logical_kv_heads, self.head_dim)

    def needs_head_remap(self, other: KVGeometry) -> bool:
        """Compatible, but the buffers hold different numbers of head replicas (tp > heads)."""
        return self.num_kv_heads != other.num_kv_heads

    @property
    def logical_kv_heads(self) -> int:
        """The model's KV heads (num_kv_heads counts replicas when tp > the model's heads)."""
        return self.model_kv_heads or self.num_kv_heads

    def compatible_with(self, other: KVGeometry) -> bool:
        return self.compat_key == other.compat_key

    def mismatches(self, other: KVGeometry) -> list[str]:
        """Every compatibility field that differs, as "name: ours X, peer Y"."""
        return [
            f"{name}: ours {getattr(self, name)!r}, peer {getattr(other, name)!r}"
            for name in self.COMPAT_FIELDS
            if getattr(self, name) != getattr(other, name)
        ]

    # -- byte layout (cached: block_offset is on the transports' hot path) ---------------------

    @functools.cached_property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @functools.cached_property
    def bytes_per_block(self) -> int:
        return self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_region(self) -> int:
        return self.num_blocks * self.bytes_per_block

    @property
    def total_bytes(self) -> int:
        return self.num_layers * 2 * self.bytes_per_region

    def region_offset(self, layer: int, kind: int) -> int:
        """Byte offset of (layer, kind) from the buffer base."""
        return (layer * 2 + kind) * self.bytes_per_region

    def block_offset(self, layer: int, kind: int, block_id: int) -> int:
        """Byte offset of one block from the buffer base."""
        return self.region_offset(layer, kind) + block_id * self.bytes_per_block

    @property
    def torch_dtype(self) -> torch.dtype:
        from splitwise.engine.config import DTYPES  # torch only where a tensor is made

        return DTYPES[self.dtype]

    @staticmethod
    def blocks_for_memory(
        memory_bytes: int, *, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: str
    ) -> int:
        per_block_all_layers = 2 * num_layers * block_size * num_kv_heads * head_dim * ITEMSIZE[dtype]
        return max(1, memory_bytes // per_block_all_layers)
