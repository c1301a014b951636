"""Each rank's view of the instance's KV buffer (CPU: one POSIX shared-memory segment).

    buffer  [layers, 2, blocks, block_size, physical_kv_heads, head_dim]   (rank 0 creates it)
    rank r  buffer[..., r * kvr : (r+1) * kvr, :]                           (a strided view)

The attention code only ever views a layer's cache as [blocks * block_size, heads, head_dim]
and gathers whole blocks, both of which a head slice supports without a copy.
"""

from __future__ import annotations

import dataclasses
import mmap
import os

import torch

from splitwise.engine.kv_cache import KVCache
from splitwise.engine.parallel.errors import TensorParallelError
from splitwise.kv_geometry import KVGeometry


class RankKVView(KVCache):
    """A KVCache over a head slice of another buffer; owns nothing (``close`` unmaps only what
    ``map_shared`` mapped). Its ``geometry`` gives the slice's shape, not a byte layout: the
    transports use the instance's KVCache, never this view."""

    def __init__(
        self, full: torch.Tensor, geometry: KVGeometry, heads: range, *, mapped: mmap.mmap | None = None
    ) -> None:
        # KVCache.__init__ would allocate a buffer: this class only views one.
        self.geometry = dataclasses.replace(geometry, num_kv_heads=len(heads))
        self.device = full.device
        self.shm_name = None
        self._shm = None
        self._mapped = mapped
        self.tensor = full[..., heads.start : heads.stop, :]

    @classmethod
    def map_shared(cls, shm_name: str, geometry: KVGeometry, heads: range) -> RankKVView:
        """Map the segment rank 0 created (plain mmap: the resource tracker must not unlink it)."""
        path = f"/dev/shm/{shm_name.lstrip('/')}"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise TensorParallelError(f"the instance's KV segment {path} is gone") from None
        try:
            if os.fstat(fd).st_size < geometry.total_bytes:
                raise TensorParallelError(f"{path} is smaller than the KV geometry {geometry}")
            mapped = mmap.mmap(fd, geometry.total_bytes)
        finally:
            os.close(fd)
        flat = torch.frombuffer(mapped, dtype=torch.uint8, count=geometry.total_bytes)
        return cls(flat.view(geometry.torch_dtype).view(geometry.shape), geometry, heads, mapped=mapped)

    def close(self) -> None:
        if self._mapped is not None:
            del self.tensor  # views first, or the unmap raises BufferError
            self._mapped.close()
            self._mapped = None
