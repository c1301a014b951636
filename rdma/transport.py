"""The rdma KV transport plug-in: ``--cache-transfer-protocol rdma``.

``RdmaInitiator`` (P, rdma/initiator.py) and ``RdmaTarget`` (D, rdma/target.py) implement
``splitwise.transfer.base``'s contract over any ``rdma.verbs.VerbsBackend``: pyverbs by default
(imported only when a transport registers its KV cache), the fake fabric in tests.

Options (``TransportOptions.extra``): ``rdma_nics`` ("mlx5_0,mlx5_1"; default KVCACHE_RDMA_NICS or
detection), ``rdma_gid_index`` (RoCE source GID index; default: the first RoCE v2 IPv4 GID),
``rdma_gpu_registration`` (CUDA KV cache: ``auto`` = dma-buf, else nvidia-peermem; ``dmabuf``;
``peermem``; see rdma.resources).
"""

from __future__ import annotations

from rdma.initiator import RdmaInitiator
from rdma.target import RdmaTarget
from splitwise.transfer.registry import register_transport

register_transport("rdma", RdmaInitiator, RdmaTarget)

__all__ = ["RdmaInitiator", "RdmaTarget"]
