"""The paged KV cache: one preallocated buffer, addressable in place by a transport.

Layout (one contiguous buffer, C order)::

    dim   name          size            note
    0     layer         num_layers      outermost: "layer L" is one contiguous slab
    1     kind          2               0 = K, 1 = V
    2     block         num_blocks      block ids index this dimension
    3     kv_head       num_kv_heads    head-major inside a block (see below)
    4     slot          block_size      token position within the block
    5     head_dim      head_dim

    bytes_per_block      = block_size * num_kv_heads * head_dim * itemsize
    region(L, kind)      = base + (L * 2 + kind) * num_blocks * bytes_per_block
    address(L, kind, b)  = region(L, kind) + b * bytes_per_block

``tensor`` keeps ``KVGeometry.shape`` (..., block_size, num_kv_heads, head_dim): transports, the
geometry and the peers only ever address whole blocks, so the order inside a block is the engine's
own. The engine reads and writes a layer through ``k(layer)`` / ``v(layer)``, views of shape
[num_blocks, num_kv_heads, block_size, head_dim] over the same bytes: one kv head's keys of a block
are one contiguous [block_size, head_dim] row, so a decode step gathers K as [seq, head, key, dim]
with a single index_select and multiplies it as is (``model.attention_metadata``).

So "the blocks of request R in layer L" are (region(L, K), block ids, bytes_per_block) and the same
for V: a transport reads or writes them in place, without staging. Because every (layer, kind)
region has the same geometry on both sides of a transfer, the same arithmetic gives the destination
address from the peer's base address.
"""

from __future__ import annotations

import os
from multiprocessing import shared_memory

import torch

from splitwise.kv_geometry import KVGeometry

KIND_K = 0
KIND_V = 1


# The one geometry type (torch-free, shared with the scheduler and the transports).
KVCacheGeometry = KVGeometry


class KVCache:
    """Owns the KV buffer. ``tensor`` has ``geometry.shape``; ``k(layer)``/``v(layer)`` are views
    of shape [num_blocks, num_kv_heads, block_size, head_dim] (head-major blocks).

    On CPU with ``shm_name`` the buffer lives in POSIX shared memory (/dev/shm/<name>) so a peer
    process on the same host can map it and copy blocks straight in (the ipc transport). The
    creator unlinks it on ``close()``.
    """

    def __init__(
        self, geometry: KVCacheGeometry, *, device: str = "cpu", shm_name: str | None = None
    ) -> None:
        self.geometry = geometry
        self.device = torch.device(device)
        self.shm_name = shm_name
        self._shm: shared_memory.SharedMemory | None = None
        if shm_name is not None:
            if self.device.type != "cpu":
                raise ValueError("--kv-cache-shm: shared memory KV caches are CPU only (CUDA uses CUDA IPC)")
            self._shm = shared_memory.SharedMemory(name=shm_name, create=True, size=geometry.total_bytes)
            flat = torch.frombuffer(self._shm.buf, dtype=torch.uint8, count=geometry.total_bytes)
            self.tensor = flat.view(geometry.torch_dtype).view(geometry.shape)
            self.tensor.zero_()
        else:
            self.tensor = torch.zeros(geometry.shape, dtype=geometry.torch_dtype, device=self.device)

    @property
    def base_address(self) -> int:
        return int(self.tensor.data_ptr())

    @property
    def kv_heads(self) -> range:
        """The heads of ``k()``/``v()`` this process computes: all of them (a tensor-parallel
        rank's view of a shared buffer: its slice, ``engine.parallel.kv_view``)."""
        return range(self.geometry.num_kv_heads)

    def k(self, layer: int) -> torch.Tensor:
        return self._head_major(self.tensor[layer, KIND_K])

    def v(self, layer: int) -> torch.Tensor:
        return self._head_major(self.tensor[layer, KIND_V])

    def _head_major(self, region: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        return region.view(g.num_blocks, g.num_kv_heads, g.block_size, g.head_dim)

    def block_address(self, layer: int, kind: int, block_id: int) -> int:
        return self.base_address + self.geometry.block_offset(layer, kind, block_id)

    def as_bytes(self) -> torch.Tensor:
        """The whole buffer as a flat uint8 view (for byte-exact copies and comparisons)."""
        return self.tensor.view(-1).view(torch.uint8)

    def close(self) -> None:
        if self._shm is not None:
            # Drop tensor views before closing the mapping, or close() raises BufferError.
            del self.tensor
            self._shm.close()
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass
            self._shm = None


SHM_PREFIX = "splitwise-kv"


def default_shm_name(prefix: str = SHM_PREFIX) -> str:
    """``<prefix>-<pid>-<random>``: the pid lets a later process find segments whose owner died."""
    remove_stale_segments(prefix)
    return f"{prefix}-{os.getpid()}-{os.urandom(4).hex()}"


def remove_stale_segments(prefix: str = SHM_PREFIX, shm_dir: str = "/dev/shm") -> list[str]:
    """Unlink KV segments left by processes that died without cleaning up (SIGKILL, OOM).

    Only names of the form ``<prefix>-<pid>-<hex>`` whose pid no longer exists are removed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        parts = name[len(prefix) + 1 :].split("-") if name.startswith(prefix + "-") else []
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        try:
            os.kill(int(parts[0]), 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(shm_dir, name))
                removed.append(name)
            except OSError:
                pass
        except PermissionError:
            continue  # alive, owned by someone else
    return removed
