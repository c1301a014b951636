"""Each rank's view of the instance's KV buffer (CPU: one POSIX shared-memory segment).

    buffer  [layers, 2, blocks, physical_kv_heads, block_size, head_dim]   (head-major blocks,
                                                                           rank 0 creates it)
    rank r  heads [r * kvr, (r+1) * kvr) of every block                    (``kv_heads``)

A head slice of a head-major block is not one run of rows the attention can index flat, so a
rank's ``k()``/``v()`` are the whole layer, exactly as the instance's ``KVCache`` gives them, and
the rank's attention metadata addresses its heads in it (row = block * physical_kv_heads +
r * kvr + h, ``model.attention_metadata``). No two ranks write the same bytes.
"""

from __future__ import annotations

import mmap
import os

import torch

from splitwise.engine.kv_cache import KVCache
from splitwise.engine.parallel.errors import TensorParallelError
from splitwise.kv_geometry import KVGeometry


class RankKVView(KVCache):
    """A KVCache over another process's buffer (``geometry`` is that whole buffer's) of which the
    rank computes ``kv_heads``; owns nothing (``close`` unmaps only what ``map_shared`` mapped)."""

    def __init__(
        self, full: torch.Tensor, geometry: KVGeometry, heads: range, *, mapped: mmap.mmap | None = None
    ) -> None:
        # KVCache.__init__ would allocate a buffer: this class only views one.
        if heads.start < 0 or heads.stop > geometry.num_kv_heads or not heads:
            raise TensorParallelError(f"kv heads {heads} outside the buffer's {geometry.num_kv_heads}")
        self.geometry = geometry
        self.device = full.device
        self.shm_name = None
        self._shm = None
        self._mapped = mapped
        self._heads = heads
        self.tensor = full

    @property
    def kv_heads(self) -> range:
        return self._heads

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
