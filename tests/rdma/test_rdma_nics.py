"""NIC detection: tools/get_rdma_nics.sh and rdma/nics.py on the same fixture sysfs trees.

Every tree is checked against an exact expected answer for both modes, through BOTH implementations,
so they cannot drift apart.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from rdma_test_support import ZERO_GID, SysfsTree

from rdma import nics
from rdma.errors import NicDetectionError

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "get_rdma_nics.sh"
ROCE_GID = "0000:0000:0000:0000:0000:ffff:c0a8:0001"
IB_GID = "fe80:0000:0000:0000:0002:c903:0001:0001"
ACTIVE_ROCE = ("4: ACTIVE", "Ethernet", [ROCE_GID])
ACTIVE_IB = ("4: ACTIVE", "InfiniBand", [IB_GID])
DOWN_ROCE = ("1: DOWN", "Ethernet", [ROCE_GID])


def tree_none(t: SysfsTree) -> None:
    t.gpu("pci0000:00/0000:00:02.0/0000:03:00.0")


def tree_one_mlx5(t: SysfsTree) -> None:
    t.nic("mlx5_0", "pci0000:00/0000:00:01.0/0000:01:00.0", netdev="ens1f0np0")
    t.gpu("pci0000:00/0000:00:02.0/0000:03:00.0")


def tree_kernel_layout(t: SysfsTree) -> None:
    # class/infiniband/<dev> symlinked into the PCI device, as on a real machine; mixed with the
    # plain-directory layout to show both resolve to the same PCI path.
    t.nic("mlx5_0", "pci0000:00/0000:00:01.0/0000:01:00.0", numa_node=0, kernel_layout=True)
    t.nic(
        "mlx5_1",
        "pci0000:00/0000:00:02.0/0000:02:00.0/0000:03:00.0/0000:04:00.0",
        numa_node=0,
        kernel_layout=True,
    )
    t.gpu("pci0000:00/0000:00:02.0/0000:02:00.0/0000:03:01.0/0000:05:00.0", numa_node=0)


def tree_no_gpu(t: SysfsTree) -> None:
    t.nic("mlx5_0", "pci0000:00/0000:00:01.0/0000:01:00.0")


def tree_active_and_down(t: SysfsTree) -> None:
    t.nic("mlx5_0", "pci0000:00/0000:00:01.0/0000:01:00.0", ports={1: DOWN_ROCE})
    t.nic("mlx5_1", "pci0000:00/0000:00:01.1/0000:02:00.0", ports={1: DOWN_ROCE, 2: ACTIVE_ROCE})
    t.nic("mlx5_2", "pci0000:00/0000:00:01.2/0000:05:00.0", ports={1: ("2: INIT", "InfiniBand", [IB_GID])})
    t.gpu("pci0000:00/0000:00:03.0/0000:07:00.0")


def tree_only_down(t: SysfsTree) -> None:
    t.nic("mlx5_0", "pci0000:00/0000:00:01.0/0000:01:00.0", ports={1: DOWN_ROCE})
    t.gpu("pci0000:00/0000:00:02.0/0000:03:00.0")


def tree_roce_and_ib(t: SysfsTree) -> None:
    # Zero-GID RoCE (no IP on the netdev) does not count; IB needs no GID check.
    t.nic("mlx5_0", "pci0000:00/0000:00:01.0/0000:01:00.0", ports={1: ("4: ACTIVE", "Ethernet", [ZERO_GID])})
    t.nic("mlx5_1", "pci0000:00/0000:00:01.1/0000:02:00.0", ports={1: ACTIVE_ROCE})
    t.nic("mlx5_10", "pci0000:00/0000:00:01.2/0000:04:00.0", ports={1: ACTIVE_IB})
    t.nic("mlx5_2", "pci0000:00/0000:00:01.3/0000:05:00.0", ports={1: ACTIVE_IB})
    t.gpu("pci0000:00/0000:00:01.2/0000:06:00.0", pci_class="0x030000")


def tree_two_numa(t: SysfsTree) -> None:
    # Node 0: host bridges pci0000:00 and pci0000:17; node 1: pci0000:80 and pci0000:97.
    # Each GPU sits alone under its own host bridge, so only NUMA can decide. Names are chosen so
    # that plain name order would give the wrong answer.
    t.nic("mlx5_0", "pci0000:80/0000:80:01.0/0000:81:00.0", numa_node=1)
    t.nic("mlx5_1", "pci0000:00/0000:00:01.0/0000:01:00.0", numa_node=0)
    t.gpu("pci0000:17/0000:17:01.0/0000:18:00.0", numa_node=0)
    t.gpu("pci0000:97/0000:97:01.0/0000:98:00.0", numa_node=1)
    t.gpu("pci0000:17/0000:17:02.0/0000:19:00.0", numa_node=0)


def tree_pcie_switch(t: SysfsTree) -> None:
    # GPU 0 and mlx5_1 share a PCIe switch (0000:01:00.0 upstream, 0000:02:0x.0 downstream ports);
    # mlx5_0 only shares the root complex with it. GPU 1 is on node 1 with mlx5_2, but mlx5_3 is
    # behind its root port: deeper beats same-NUMA-only.
    sw = "pci0000:00/0000:00:01.0/0000:01:00.0"
    t.nic("mlx5_0", "pci0000:00/0000:00:03.0/0000:06:00.0", numa_node=0)
    t.nic("mlx5_1", f"{sw}/0000:02:01.0/0000:04:00.0", numa_node=0)
    t.gpu(f"{sw}/0000:02:00.0/0000:03:00.0", numa_node=0)
    t.nic("mlx5_2", "pci0000:80/0000:80:02.0/0000:82:00.0", numa_node=1)
    t.nic("mlx5_3", "pci0000:80/0000:80:01.0/0000:83:00.0", numa_node=1)
    t.gpu("pci0000:80/0000:80:01.0/0000:84:00.0", numa_node=1)


# tree builder -> (cpu answer, gpu answer); None = exit 1, nothing on stdout.
CASES: dict[str, tuple[Callable[[SysfsTree], None], list[str] | None, list[str] | None]] = {
    "none": (tree_none, None, None),
    "one_active_mlx5": (tree_one_mlx5, ["mlx5_0"], ["mlx5_0"]),
    "no_gpu": (tree_no_gpu, ["mlx5_0"], None),
    "kernel_symlink_layout": (tree_kernel_layout, ["mlx5_0", "mlx5_1"], ["mlx5_1"]),
    "active_and_down_ports": (tree_active_and_down, ["mlx5_1"], ["mlx5_1"]),
    "only_down_ports": (tree_only_down, None, None),
    "roce_and_infiniband": (tree_roce_and_ib, ["mlx5_1", "mlx5_2", "mlx5_10"], ["mlx5_10"]),
    "two_numa_nodes": (tree_two_numa, ["mlx5_0", "mlx5_1"], ["mlx5_1", "mlx5_1", "mlx5_0"]),
    "pcie_switch": (tree_pcie_switch, ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"], ["mlx5_1", "mlx5_3"]),
}


def run_script(root: Path, mode: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SYSFS_ROOT": str(root)}
    return subprocess.run(["bash", str(SCRIPT), mode], env=env, capture_output=True, text=True, timeout=30)


def run_python(
    root: Path, mode: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    monkeypatch.setenv("SYSFS_ROOT", str(root))
    rc = nics.main([mode])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("mode", ["cpu", "gpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_module_gives_the_expected_answer(
    case: str,
    mode: str,
    sysfs: SysfsTree,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    build, cpu_answer, gpu_answer = CASES[case]
    build(sysfs)
    expected = cpu_answer if mode == "cpu" else gpu_answer
    rc, out, err = run_python(sysfs.root, mode, capsys, monkeypatch)
    if expected is None:
        assert (rc, out) == (1, "")
        assert "get_rdma_nics: no " in err
    else:
        assert (rc, out, err) == (0, f"KVCACHE_RDMA_NICS={','.join(expected)}\n", "")


@pytest.mark.parametrize(
    ("case", "mode"), [("pcie_switch", "gpu"), ("roce_and_infiniband", "cpu"), ("no_gpu", "gpu")]
)
def test_script_is_the_module_behind_a_wrapper(
    case: str,
    mode: str,
    sysfs: SysfsTree,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One implementation: the script passes arguments, output and exit status through unchanged
    (a success, a detection failure; usage errors in test_bad_mode_is_usage_error)."""
    CASES[case][0](sysfs)
    script = run_script(sysfs.root, mode)
    rc, out, err = run_python(sysfs.root, mode, capsys, monkeypatch)
    assert (script.returncode, script.stdout, script.stderr) == (rc, out, err)


def test_bad_mode_is_usage_error(sysfs: SysfsTree) -> None:
    assert run_script(sysfs.root, "xpu").returncode == 2
    assert nics.main(["xpu"]) == 2


def test_module_reports_topology_details(sysfs: SysfsTree) -> None:
    tree_pcie_switch(sysfs)
    found = {nic.name: nic for nic in nics.list_nics(sysfs.root)}
    assert found["mlx5_1"].pci_path == (
        "pci0000:00",
        "0000:00:01.0",
        "0000:01:00.0",
        "0000:02:01.0",
        "0000:04:00.0",
    )
    assert found["mlx5_1"].numa_node == 0 and found["mlx5_1"].active_ports == (1,)
    gpus = nics.list_gpus(sysfs.root)
    assert [g.pci_address for g in gpus] == ["0000:03:00.0", "0000:84:00.0"]  # audio functions excluded
    assert nics.common_depth(gpus[0].pci_path, found["mlx5_1"].pci_path) == 3


def test_netdev_names_are_reported(sysfs: SysfsTree) -> None:
    tree_one_mlx5(sysfs)
    assert nics.list_nics(sysfs.root)[0].netdevs == ("ens1f0np0",)


def test_resolve_prefers_environment(sysfs: SysfsTree) -> None:
    # The tree has nothing active: the env var alone decides.
    assert nics.resolve_nics("gpu", env={"KVCACHE_RDMA_NICS": "mlx5_3, mlx5_4"}, sysfs_root=sysfs.root) == [
        "mlx5_3",
        "mlx5_4",
    ]


def test_resolve_detects_when_environment_unset(sysfs: SysfsTree) -> None:
    tree_two_numa(sysfs)
    assert nics.resolve_nics("gpu", env={"SYSFS_ROOT": str(sysfs.root)}) == ["mlx5_1", "mlx5_1", "mlx5_0"]
    with pytest.raises(NicDetectionError, match="no RDMA device with an active port"):
        nics.resolve_nics("gpu", env={"SYSFS_ROOT": str(sysfs.root / "nothing")})
    with pytest.raises(ValueError, match="KVCACHE_RDMA_NICS"):
        nics.parse_nic_list(" , ")


def tree_two_nics_on_the_gpu_switch(t: SysfsTree) -> None:
    # GPU 0 shares a PCIe switch with mlx5_1 AND mlx5_2 (a dual-NIC-per-GPU box); mlx5_0 is farther.
    sw = "pci0000:00/0000:00:01.0/0000:01:00.0"
    t.nic("mlx5_0", "pci0000:00/0000:00:03.0/0000:06:00.0", numa_node=0)
    t.nic("mlx5_1", f"{sw}/0000:02:01.0/0000:04:00.0", numa_node=0)
    t.nic("mlx5_2", f"{sw}/0000:02:02.0/0000:05:00.0", numa_node=0)
    t.gpu(f"{sw}/0000:02:00.0/0000:03:00.0", numa_node=0)


def test_stripe_lists_every_nic_tied_for_nearest_in_script_and_module(
    sysfs: SysfsTree, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tree_two_nics_on_the_gpu_switch(sysfs)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SYSFS_ROOT": str(sysfs.root)}
    script = subprocess.run(
        ["bash", str(SCRIPT), "gpu", "--stripe"], env=env, capture_output=True, text=True, timeout=30
    )
    monkeypatch.setenv("SYSFS_ROOT", str(sysfs.root))
    rc = nics.main(["gpu", "--stripe"])
    out, _ = capsys.readouterr()
    assert (script.returncode, script.stdout) == (rc, out) == (0, "KVCACHE_RDMA_NICS=mlx5_1+mlx5_2\n")
    assert nics.main(["gpu"]) == 0
    assert capsys.readouterr()[0] == "KVCACHE_RDMA_NICS=mlx5_1\n"  # FastDeploy's one-per-GPU form
    assert nics.nics_for_gpu(0, env={"SYSFS_ROOT": str(sysfs.root)}) == ["mlx5_1", "mlx5_2"]


def test_cuda_visible_devices_maps_the_logical_gpu_to_its_physical_nic(sysfs: SysfsTree) -> None:
    tree_two_numa(sysfs)  # physical GPUs (PCI order) 0, 1, 2 -> mlx5_1, mlx5_1, mlx5_0
    root = {"SYSFS_ROOT": str(sysfs.root)}
    assert nics.nics_for_gpu(0, env=root) == ["mlx5_1"]
    assert nics.nics_for_gpu(0, env={**root, "CUDA_VISIBLE_DEVICES": "2"}) == ["mlx5_0"]
    assert nics.nics_for_gpu(0, env={**root, "CUDA_VISIBLE_DEVICES": "2,1"}) == ["mlx5_0"]
    assert nics.nics_for_gpu(1, env={**root, "CUDA_VISIBLE_DEVICES": "2,1"}) == ["mlx5_1"]
    # The GPU's own PCI address (from torch on a CUDA machine) beats index arithmetic.
    assert nics.nics_for_gpu(0, env=root, pci_address="0000:98:00.0") == ["mlx5_0"]
    # The configured list is indexed by physical GPU too; '+' entries stripe.
    configured = {"KVCACHE_RDMA_NICS": "mlx5_0,mlx5_2+mlx5_3", "CUDA_VISIBLE_DEVICES": "1"}
    assert nics.nics_for_gpu(0, env=configured) == ["mlx5_2", "mlx5_3"]
    with pytest.raises(NicDetectionError, match="UUID or MIG"):
        nics.nics_for_gpu(0, env={**root, "CUDA_VISIBLE_DEVICES": "GPU-8f2c1a"})
    with pytest.raises(NicDetectionError, match="no GPU 1"):
        nics.physical_gpu_index(1, {"CUDA_VISIBLE_DEVICES": "0"})
