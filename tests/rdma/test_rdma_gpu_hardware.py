"""GPU KV registration against the real CUDA driver and a real NIC: the driver's dma-buf export of a
tensor inside a larger allocation (``gpu``), and a GPU-to-GPU transfer through a pyverbs loopback
by each registration path (``gpu`` and ``rdma``); both skip with the reason where the hardware is
missing. Plus the error when no CUDA binding loads at all (runs everywhere). The fake-driver and
fake-fabric side is in test_rdma_gpu_memory.py.
"""

from __future__ import annotations

import pytest
import torch

from rdma.errors import CudaUnavailableError, DmaBufUnsupportedError, GpuRegistrationError
from rdma.gpu_memory import export_dmabuf
from rdma.resources import OPTION_GPU_REGISTRATION
from rdma.testing import pyverbs_backend_or_skip
from rdma.transport import RdmaInitiator, RdmaTarget
from splitwise.engine.kv_cache import KVCache, KVCacheGeometry
from splitwise.engine.layer_ready import record_layer_ready
from splitwise.transfer.base import TransportOptions

PAGE = 4096
GEOMETRY = KVCacheGeometry(
    num_layers=3, num_blocks=16, block_size=4, num_kv_heads=2, head_dim=8, dtype="float16"
)
KV_BYTES = GEOMETRY.total_bytes


def test_without_any_cuda_binding_the_error_names_both_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    import rdma.cuda_driver as cuda_driver

    def no_cuda_python() -> None:
        raise ImportError("No module named 'cuda'")

    def no_libcuda() -> None:
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(cuda_driver, "CudaPythonDriver", no_cuda_python)
    monkeypatch.setattr(cuda_driver, "CtypesCudaDriver", no_libcuda)
    with pytest.raises(
        CudaUnavailableError, match="cuda-python is not importable.*libcuda.so.1 does not load"
    ):
        cuda_driver.load_cuda_driver()


def cuda_or_skip() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")


@pytest.mark.gpu
def test_real_driver_exports_a_tensor_inside_a_larger_allocation() -> None:
    """The real CUDA driver: the range found around a slice of a tensor, and a dma-buf fd for it."""
    cuda_or_skip()
    from rdma.cuda_driver import load_cuda_driver

    try:
        driver = load_cuda_driver()
    except CudaUnavailableError as exc:
        pytest.skip(str(exc))
    whole = torch.empty(8 << 20, dtype=torch.uint8, device="cuda")
    piece = whole[(1 << 20) + 256 : (2 << 20)]
    base, size = driver.address_range(0, piece.data_ptr())
    assert base <= whole.data_ptr() and piece.data_ptr() + piece.numel() <= base + size
    try:
        export = export_dmabuf(driver, 0, piece.data_ptr(), piece.numel())
    except DmaBufUnsupportedError as exc:
        pytest.skip(f"dma-buf is not supported on this machine: {exc}")
    try:
        assert export.fd >= 0
        assert export.range.tensor_offset == piece.data_ptr() - base
        assert export.range.mr_offset % PAGE == 0 and export.range.mr_length % PAGE == 0
    finally:
        driver.close_dmabuf(export.fd)


@pytest.mark.gpu
@pytest.mark.rdma
@pytest.mark.parametrize("mode", ["dmabuf", "peermem"])
def test_gpu_kv_transfer_over_pyverbs_loopback(mode: str) -> None:
    """GPU to GPU through a real NIC (P and D on one device), by each registration path."""
    cuda_or_skip()
    backend, name = pyverbs_backend_or_skip()
    options = TransportOptions(
        cluster_token="test-cluster-token", host="127.0.0.1", port=0, extra={OPTION_GPU_REGISTRATION: mode}
    )
    target, initiator = (
        RdmaTarget(options, backend=backend, nics=[name]),
        RdmaInitiator(options, backend=backend, nics=[name]),
    )
    p_cache, d_cache = KVCache(GEOMETRY, device="cuda"), KVCache(GEOMETRY, device="cuda")
    p_cache.as_bytes().copy_(torch.randint(0, 256, (KV_BYTES,), dtype=torch.uint8, device="cuda"))
    try:
        try:
            target.register(d_cache)
            initiator.register(p_cache)
        except (GpuRegistrationError, CudaUnavailableError) as exc:
            pytest.skip(f"GPU memory cannot be registered by {mode} on {name}: {exc}")
        initiator.connect("d", target.endpoint())
        src, dst = [1, 2, 3, 9], [5, 6, 7, 0]
        target.expect("r1", dst, timeout_s=30)
        for layer in range(GEOMETRY.num_layers):
            initiator.write_layer("d", "r1", layer, src, dst, record_layer_ready(p_cache.device))
        initiator.finish("d", "r1")
        assert initiator.wait("r1", 30).is_done and target.poll("r1").is_done
        torch.cuda.synchronize()
        for layer in range(GEOMETRY.num_layers):
            for kind in (0, 1):
                assert torch.equal(
                    d_cache.tensor[layer, kind, dst].cpu(), p_cache.tensor[layer, kind, src].cpu()
                )
    finally:
        initiator.close()
        target.close()
