"""GPU KV registration: dma-buf first, nvidia-peermem fallback, a clear error otherwise.

Everywhere: the dma-buf range arithmetic, the decision logic over a fake CUDA driver, and whole
transfers over the fake verbs fabric where "GPU" KV caches are host buffers inside larger
page-aligned "allocations", registered as IOVA-addressed dma-buf MRs (so a VA/IOVA mix-up lands
bytes in the wrong place or fails). The real CUDA driver and a real NIC:
test_rdma_gpu_hardware.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

from rdma.errors import (
    CudaCallError,
    CudaUnavailableError,
    DmaBufUnsupportedError,
    GpuMemoryError,
    GpuRegistrationError,
)
from rdma.fake import FakeBackend, FakeCudaDriver, FakeFabric, FakePort
from rdma.gpu_memory import (
    CUDA_ERROR_INVALID_VALUE,
    CUDA_ERROR_NOT_SUPPORTED,
    DmaBufRange,
    export_dmabuf,
    plan_dmabuf_range,
)
from rdma.resources import OPTION_GPU_REGISTRATION, GpuPolicy, KvMemory, NicResources, open_nics
from rdma.transport import RdmaInitiator, RdmaTarget
from rdma.verbs import Access, WcStatus, WorkRequest
from splitwise.engine.kv_cache import KVCache, KVCacheGeometry
from splitwise.transfer.base import TransferCounters, TransportOptions

PAGE = 4096
GEOMETRY = KVCacheGeometry(
    num_layers=3, num_blocks=16, block_size=4, num_kv_heads=2, head_dim=8, dtype="float16"
)
KV_BYTES = GEOMETRY.total_bytes  # 12288: three pages
RW = Access.LOCAL_WRITE | Access.REMOTE_WRITE
CUDA_ERROR_OUT_OF_MEMORY = 2

# --------------------------------------------------------------------------- the arithmetic

BASE = 0x7F00_0000_0000


@pytest.mark.parametrize(
    ("tensor_offset", "nbytes", "expected"),
    [
        # tensor_offset  nbytes   mr_offset  mr_length  (dma-buf offsets; IOVA = offset)
        (0, 3 * PAGE, (0, 3 * PAGE)),  # a whole-page tensor at the allocation's start
        (PAGE + 256, 10_000, (PAGE, 3 * PAGE)),  # [4352, 14352) -> pages [4096, 16384)
        (5 * PAGE - 2, 4, (4 * PAGE, 2 * PAGE)),  # 4 bytes straddling a page boundary
        (7 * PAGE, PAGE, (7 * PAGE, PAGE)),  # the allocation's last page
    ],
)
def test_a_tensor_inside_a_larger_allocation_maps_to_page_aligned_offsets(
    tensor_offset: int, nbytes: int, expected: tuple[int, int]
) -> None:
    planned = plan_dmabuf_range(BASE + tensor_offset, nbytes, BASE, 8 * PAGE, page_bytes=PAGE)
    assert planned == DmaBufRange(BASE, 8 * PAGE, expected[0], expected[1], tensor_offset)
    assert planned.mr_offset % PAGE == 0 and planned.mr_length % PAGE == 0
    assert planned.mr_offset <= planned.tensor_offset
    assert planned.tensor_offset + nbytes <= planned.mr_offset + planned.mr_length <= planned.alloc_bytes


def test_a_tensor_outside_its_allocation_is_an_error_not_a_fallback() -> None:
    with pytest.raises(GpuMemoryError, match="not inside its allocation") as info:
        plan_dmabuf_range(BASE + 8 * PAGE - 2, 4, BASE, 8 * PAGE, page_bytes=PAGE)
    assert not isinstance(info.value, DmaBufUnsupportedError)


def test_an_allocation_off_the_page_grid_cannot_be_exported() -> None:
    with pytest.raises(DmaBufUnsupportedError, match="not aligned"):
        plan_dmabuf_range(BASE + 512, 4, BASE + 256, 8 * PAGE, page_bytes=PAGE)


# --------------------------------------------------------------------------- the decision logic


class FakeGpuKv:
    """A KV cache that reads as CUDA device 0 while living in host memory at byte ``offset_bytes``
    of a larger page-aligned buffer that the fake driver calls one CUDA allocation."""

    def __init__(
        self, driver: FakeCudaDriver, *, offset_bytes: int = PAGE + 768, seed: int | None = None
    ) -> None:
        self.alloc_bytes = -(-(offset_bytes + KV_BYTES) // PAGE) * PAGE + 2 * PAGE
        raw = torch.zeros(self.alloc_bytes + PAGE, dtype=torch.uint8)
        start = (-raw.data_ptr()) % PAGE
        self.arena = raw[start : start + self.alloc_bytes]  # keeps ``raw`` alive
        self.base = self.arena.data_ptr()
        self.offset_bytes = offset_bytes
        self.cache = KVCache(GEOMETRY)
        self.cache.tensor = (
            self.arena[offset_bytes : offset_bytes + KV_BYTES].view(GEOMETRY.torch_dtype).view(GEOMETRY.shape)
        )
        self.cache.device = torch.device("cuda", 0)
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
            self.cache.as_bytes().copy_(
                torch.randint(0, 256, (KV_BYTES,), dtype=torch.uint8, generator=generator)
            )
        driver.add_allocation(self.base, self.alloc_bytes)


def fabric_with(*names: str, dmabuf: bool = True) -> FakeFabric:
    fabric = FakeFabric()
    for index, name in enumerate(names):
        fabric.add_device(
            name, FakePort(gid=f"0000:0000:0000:0000:0000:ffff:0a00:{index + 1:04x}", supports_dmabuf=dmabuf)
        )
    return fabric


def register(
    fabric: FakeFabric,
    driver: FakeCudaDriver,
    kv: KVCache,
    mode: str = "auto",
    names: tuple[str, ...] = ("nic0",),
) -> tuple[list[NicResources], TransferCounters]:
    counters = TransferCounters()
    options = TransportOptions(cluster_token="test-cluster-token", extra={OPTION_GPU_REGISTRATION: mode})
    nics = open_nics(
        FakeBackend(fabric), names, kv, RW, gpu=GpuPolicy.from_options(options, driver), counters=counters
    )
    return nics, counters


def test_dmabuf_when_supported_registers_the_tensor_pages_at_their_dma_buf_offset() -> None:
    fabric = fabric_with("nic0")
    driver = FakeCudaDriver(fabric)
    gpu = FakeGpuKv(driver, offset_bytes=PAGE + 768)
    [nic], counters = register(fabric, driver, gpu.cache)
    assert nic.kv_memory is KvMemory.DMABUF
    assert (nic.kv.addr, nic.kv.length) == (PAGE, 4 * PAGE)  # pages [4096, 20480) hold [4864, 17152)
    assert nic.kv_addr == PAGE + 768 != gpu.cache.base_address  # the IOVA, not the VA
    assert driver.num_exports == 1 and driver.num_open_fds == 0  # fd closed once registered
    assert counters.get("gpu_dmabuf_fallbacks") == 0


def test_one_export_serves_every_nic() -> None:
    fabric = fabric_with("nic0", "nic1")
    driver = FakeCudaDriver(fabric)
    gpu = FakeGpuKv(driver)
    nics, _ = register(fabric, driver, gpu.cache, names=("nic0", "nic1"))
    assert [n.kv_memory for n in nics] == [KvMemory.DMABUF, KvMemory.DMABUF]
    assert driver.num_exports == 1 and driver.num_open_fds == 0


@pytest.mark.parametrize(
    ("case", "cause"),
    [
        ("attribute", "CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED = 0"),
        ("export_not_supported", "refused the dma-buf export"),
        ("export_invalid_value", "refused the dma-buf export"),
        ("nic_eopnotsupp", "refused the dma-buf MR"),
    ],
)
def test_auto_falls_back_to_peermem_logged_and_counted(
    case: str, cause: str, caplog: pytest.LogCaptureFixture
) -> None:
    fabric = fabric_with("nic0", dmabuf=case != "nic_eopnotsupp")
    export_result = {
        "export_not_supported": CUDA_ERROR_NOT_SUPPORTED,
        "export_invalid_value": CUDA_ERROR_INVALID_VALUE,
    }.get(case)
    driver = FakeCudaDriver(fabric, dmabuf_supported=case != "attribute", export_result=export_result)
    gpu = FakeGpuKv(driver)
    with caplog.at_level(logging.WARNING, logger="rdma.resources"):
        [nic], counters = register(fabric, driver, gpu.cache)
    assert nic.kv_memory is KvMemory.PEERMEM
    assert nic.kv.addr == nic.kv_addr == gpu.cache.base_address  # peermem MRs are VA-addressed
    assert counters.get("gpu_dmabuf_fallbacks") == 1
    assert cause in caplog.text and "falling back to nvidia-peermem" in caplog.text
    assert driver.num_open_fds == 0


def test_dmabuf_mode_refuses_the_fallback_and_names_the_cause() -> None:
    fabric = fabric_with("nic0")
    driver = FakeCudaDriver(fabric, dmabuf_supported=False)
    gpu = FakeGpuKv(driver)
    with pytest.raises(
        GpuRegistrationError, match="DMA_BUF_SUPPORTED = 0.*forbids the nvidia-peermem fallback"
    ):
        register(fabric, driver, gpu.cache, mode="dmabuf")


def test_neither_path_is_one_error_naming_both_causes() -> None:
    fabric = fabric_with("nic0", dmabuf=False)
    fabric.peermem_loaded = False
    driver = FakeCudaDriver(fabric)
    gpu = FakeGpuKv(driver)
    with pytest.raises(GpuRegistrationError) as info:
        register(fabric, driver, gpu.cache)
    message = str(info.value)
    assert "dma-buf: nic0 refused the dma-buf MR" in message and "EOPNOTSUPP" in message
    assert "nvidia-peermem:" in message and "EFAULT" in message and "lsmod | grep nvidia_peermem" in message
    assert driver.num_open_fds == 0


def test_peermem_mode_never_touches_the_cuda_driver() -> None:
    fabric = fabric_with("nic0")
    driver = FakeCudaDriver(fabric)
    gpu = FakeGpuKv(driver)
    [nic], counters = register(fabric, driver, gpu.cache, mode="peermem")
    assert nic.kv_memory is KvMemory.PEERMEM and driver.num_exports == 0
    assert counters.get("gpu_dmabuf_fallbacks") == 0


def test_an_unexpected_cuda_failure_is_raised_not_papered_over() -> None:
    fabric = fabric_with("nic0")
    driver = FakeCudaDriver(fabric, export_result=CUDA_ERROR_OUT_OF_MEMORY)
    gpu = FakeGpuKv(driver)
    with pytest.raises(CudaCallError) as info:
        register(fabric, driver, gpu.cache)
    assert (info.value.call, info.value.code) == ("cuMemGetHandleForAddressRange", CUDA_ERROR_OUT_OF_MEMORY)


def test_a_pointer_in_no_allocation_is_a_cuda_error() -> None:
    driver = FakeCudaDriver(FakeFabric())
    with pytest.raises(CudaCallError, match="CUDA_ERROR_NOT_FOUND"):
        export_dmabuf(driver, 0, 0x1000, 64)


def test_one_nic_refusing_dma_buf_sends_every_nic_to_peermem() -> None:
    fabric = (
        FakeFabric()
        .add_device("nic0")
        .add_device("nic1", FakePort(gid="0000:0000:0000:0000:0000:ffff:0a00:0009", supports_dmabuf=False))
    )
    driver = FakeCudaDriver(fabric)
    gpu = FakeGpuKv(driver)
    nics, _ = register(fabric, driver, gpu.cache, names=("nic0", "nic1"))
    assert [n.kv_memory for n in nics] == [KvMemory.PEERMEM, KvMemory.PEERMEM]
    nic0 = nics[0].device
    assert sorted(mr.addr for mr in nic0.mrs.values()) == sorted(
        [gpu.cache.base_address, nics[0].doorbell.addr]
    )  # type: ignore[attr-defined]


def test_a_missing_cuda_binding_falls_back_in_auto_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    import rdma.cuda_driver

    def missing() -> None:
        raise CudaUnavailableError("no CUDA driver binding: test")

    monkeypatch.setattr(rdma.cuda_driver, "load_cuda_driver", missing)
    fabric = fabric_with("nic0")
    gpu = FakeGpuKv(FakeCudaDriver(fabric))
    counters = TransferCounters()
    [nic] = open_nics(FakeBackend(fabric), ["nic0"], gpu.cache, RW, gpu=GpuPolicy(), counters=counters)
    assert nic.kv_memory is KvMemory.PEERMEM and counters.get("gpu_dmabuf_fallbacks") == 1


def test_cpu_kv_is_a_plain_mr_and_never_asks_cuda() -> None:
    fabric = fabric_with("nic0")
    driver = FakeCudaDriver(fabric, export_result=CUDA_ERROR_OUT_OF_MEMORY)
    cache = KVCache(GEOMETRY)
    [nic], _ = register(fabric, driver, cache)
    assert nic.kv_memory is KvMemory.HOST and nic.kv_addr == nic.kv.addr == cache.base_address
    assert driver.num_exports == 0


def test_an_unknown_registration_mode_names_the_option() -> None:
    with pytest.raises(ValueError, match="rdma_gpu_registration: 'gdr' is not one of auto, dmabuf, peermem"):
        GpuPolicy.from_options(
            TransportOptions(cluster_token="test-cluster-token", extra={OPTION_GPU_REGISTRATION: "gdr"})
        )


def test_pyverbs_errno_is_kept_for_the_fallback_decision() -> None:
    """pyverbs reports ibv_reg_dmabuf_mr's errno as ``error_code`` (-1 when it has none)."""
    from rdma.pyverbs_backend import errno_of

    class FakePyverbsError(Exception):
        def __init__(self, error_code: int) -> None:
            super().__init__("Failed to register a dma-buf MR")
            self.error_code = error_code

    assert errno_of(FakePyverbsError(95)) == 95  # EOPNOTSUPP: fall back
    assert errno_of(FakePyverbsError(-1)) is None  # no errno: a plain failure
    assert errno_of(ValueError("x")) is None


# --------------------------------------------------------------------------- the fake's dma-buf MRs


def test_a_dma_buf_mr_is_reached_by_iova_and_the_gpu_va_is_refused() -> None:
    """The pyverbs pitfall, made executable: remote addresses of a DmaBufMR are dma-buf offsets."""
    from rdma_test_support import Buffer, connected_pair

    fabric = fabric_with("nic0")
    driver = FakeCudaDriver(fabric)
    gpu = FakeGpuKv(driver)
    device = FakeBackend(fabric).open_device("nic0")
    port = device.query_port(1)
    a, _ = connected_pair(device, port)
    src = Buffer(256, b"\x5a")
    src_mr = device.register_memory(src.addr, 256, Access.LOCAL_WRITE)
    fd = driver.export_dmabuf(0, gpu.base, gpu.alloc_bytes)
    dst_mr = device.register_dmabuf(fd, PAGE, 4 * PAGE, RW)
    driver.close_dmabuf(fd)
    assert dst_mr.addr == PAGE  # IOVA = offset

    target_offset = gpu.offset_bytes + 128  # 128 bytes into the KV tensor
    a.qp.post_send([WorkRequest(1, src.addr, 256, src_mr.lkey, target_offset, dst_mr.rkey, signaled=True)])
    [done] = a.qp.poll_send(1)
    assert done.ok
    landed = bytes(gpu.arena[target_offset : target_offset + 256].numpy())
    assert landed == b"\x5a" * 256
    assert bytes(gpu.arena[:target_offset].numpy()) == bytes(target_offset)  # nothing else touched

    a.qp.post_send(
        [WorkRequest(2, src.addr, 256, src_mr.lkey, gpu.base + target_offset, dst_mr.rkey, signaled=True)]
    )
    [refused] = a.qp.poll_send(1)
    assert refused.status is WcStatus.REM_ACCESS_ERR  # the GPU VA is outside the MR's IOVA range


def test_register_dmabuf_checks_the_fd_and_the_range() -> None:
    from rdma.errors import VerbsCallError

    fabric = fabric_with("nic0")
    driver = FakeCudaDriver(fabric)
    gpu = FakeGpuKv(driver)
    device = FakeBackend(fabric).open_device("nic0")
    fd = driver.export_dmabuf(0, gpu.base, gpu.alloc_bytes)
    with pytest.raises(VerbsCallError, match="outside"):
        device.register_dmabuf(fd, gpu.alloc_bytes - PAGE, 2 * PAGE, RW)
    driver.close_dmabuf(fd)
    with pytest.raises(VerbsCallError, match="EBADF"):
        device.register_dmabuf(fd, 0, PAGE, RW)


# --------------------------------------------------------------------------- whole transfers


def blocks(cache: KVCache, layer: int, kind: int, block_ids: list[int]) -> bytes:
    return b"".join(
        bytes(cache.tensor[layer, kind, b].contiguous().view(torch.uint8).numpy()) for b in block_ids
    )


@pytest.fixture()
def fake_gpus() -> Iterator[tuple[FakeFabric, FakeCudaDriver]]:
    fabric = FakeFabric().add_device("fake_d0").add_device("fake_p0").add_device("fake_p1")
    yield fabric, FakeCudaDriver(fabric)


@pytest.mark.parametrize(
    ("d_mode", "p_mode"), [("dmabuf", "dmabuf"), ("dmabuf", "peermem"), ("peermem", "dmabuf")]
)
def test_gpu_kv_transfer_lands_in_the_right_blocks(
    fake_gpus: tuple[FakeFabric, FakeCudaDriver], d_mode: str, p_mode: str
) -> None:
    fabric, driver = fake_gpus
    backend = FakeBackend(fabric)
    d_gpu = FakeGpuKv(driver, offset_bytes=2 * PAGE + 512)
    p_gpu = FakeGpuKv(driver, offset_bytes=PAGE + 768, seed=0)
    d_options = TransportOptions(
        cluster_token="test-cluster-token",
        host="127.0.0.1",
        port=0,
        connect_timeout_s=5,
        extra={OPTION_GPU_REGISTRATION: d_mode},
    )
    p_options = TransportOptions(
        cluster_token="test-cluster-token", connect_timeout_s=5, extra={OPTION_GPU_REGISTRATION: p_mode}
    )
    target = RdmaTarget(d_options, backend=backend, nics=["fake_d0"], cuda_driver=driver)
    initiator = RdmaInitiator(
        p_options,
        backend=backend,
        nics=["fake_p0", "fake_p1"],
        send_queue_depth=4,
        completion_timeout_s=5,
        cuda_driver=driver,
    )
    try:
        target.register(d_gpu.cache)
        initiator.register(p_gpu.cache)
        assert [n.kv_memory.value for n in target._nics] == [d_mode]
        assert [n.kv_memory.value for n in initiator._nics] == [p_mode, p_mode]
        initiator.connect("d", target.endpoint())
        remote_kv = initiator._peers["d"].lanes[0].remote.kv_addr
        assert remote_kv == (d_gpu.offset_bytes if d_mode == "dmabuf" else d_gpu.cache.base_address)

        src, dst = [1, 2, 3, 9, 4], [5, 6, 7, 0, 12]
        target.expect("r1", dst, timeout_s=10)
        for layer in range(GEOMETRY.num_layers):
            initiator.write_layer("d", "r1", layer, src, dst)
        initiator.finish("d", "r1")
        assert initiator.wait("r1", 10).is_done and target.poll("r1").is_done
        untouched = [b for b in range(GEOMETRY.num_blocks) if b not in dst]
        for layer in range(GEOMETRY.num_layers):
            for kind in (0, 1):
                assert blocks(d_gpu.cache, layer, kind, dst) == blocks(p_gpu.cache, layer, kind, src)
                assert blocks(d_gpu.cache, layer, kind, untouched) == bytes(
                    len(untouched) * GEOMETRY.bytes_per_block
                )
        outside = torch.cat([d_gpu.arena[: d_gpu.offset_bytes], d_gpu.arena[d_gpu.offset_bytes + KV_BYTES :]])
        assert not outside.any()  # not a byte outside D's KV tensor
    finally:
        initiator.close()
        target.close()
