"""What the two rdma transport sides share: their options, counters and cluster token, and the
NICs their KV cache is registered on (``register_nics``, once, from ``register``)."""

from __future__ import annotations

from collections.abc import Sequence

from rdma.connection import QPPolicy
from rdma.gpu_memory import CudaDriver
from rdma.resources import GpuPolicy, NicResources, choose_nics, default_backend, open_nics, qp_policy
from rdma.verbs import Access, VerbsBackend
from splitwise.codes import Protocol
from splitwise.engine.kv_cache import KVCache
from splitwise.transfer import auth
from splitwise.transfer.base import TransferCounters, TransportOptions

AUTH_DOMAIN = b"splitwise-rdma-v1"  # proofs for the control channel are worthless here


def require_token(options: TransportOptions) -> bytes:
    if not options.cluster_token:
        raise ValueError(
            "rdma transport: no cluster token (TransportOptions.cluster_token); the side channel "
            "authenticates peers with it before revealing any memory key"
        )
    return auth.token_bytes(options.cluster_token)


class RdmaSide:
    protocol = Protocol.RDMA

    def __init__(
        self,
        options: TransportOptions,
        *,
        backend: VerbsBackend | None,
        nics: Sequence[str] | None,
        policy: QPPolicy | None,
        cuda_driver: CudaDriver | None,
    ) -> None:
        self.options = options
        self.counters = TransferCounters()
        self._token = require_token(options)
        self._backend = backend
        self._gpu_policy = GpuPolicy.from_options(options, cuda_driver)
        self._nic_names = list(nics) if nics else None
        self._policy = policy or qp_policy(options)
        self._nics: list[NicResources] = []
        self._kv_cache: KVCache | None = None

    def register_nics(self, kv_cache: KVCache, kv_access: Access) -> None:
        """Open the NICs (``--rdma-nics`` or detected) and register ``kv_cache`` on each."""
        backend = self._backend or default_backend(self.options)
        names = self._nic_names or choose_nics(kv_cache, self.options)
        self._nics = open_nics(
            backend, names, kv_cache, kv_access, gpu=self._gpu_policy, counters=self.counters
        )
        self._kv_cache = kv_cache
