"""Fixtures for the rdma tests: a builder of fake sysfs trees shaped like the real /sys."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# This directory is named like the top-level ``rdma`` package. pytest puts tests/ on sys.path, where
# tests/rdma would be picked up as a namespace package ahead of the editable install's import hook;
# a sys.path entry holding the real package makes the regular package win.
_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.append(_REPO_ROOT)

ZERO_GID = "0000:0000:0000:0000:0000:0000:0000:0000"


class SysfsTree:
    """Builds <root>/devices/pci.../<bdf> directories with the same symlinks the kernel makes:

    class/infiniband/<dev>/device -> ../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0
    bus/pci/devices/<bdf>         -> ../../../devices/pci0000:00/0000:00:01.0/0000:01:00.0
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "class" / "infiniband").mkdir(parents=True, exist_ok=True)
        (root / "bus" / "pci" / "devices").mkdir(parents=True, exist_ok=True)
        (root / "devices").mkdir(exist_ok=True)

    def pci_device(self, path: str, *, vendor: str, pci_class: str, numa_node: int = -1) -> Path:
        """``path`` is below devices/, e.g. "pci0000:00/0000:00:01.0/0000:01:00.0"; bridges on the
        way are created as plain directories (bridge class 0x060400)."""
        parts = path.split("/")
        for depth in range(2, len(parts)):  # the bridges between the host bridge and the device
            bridge = self.root / "devices" / "/".join(parts[:depth])
            bridge.mkdir(parents=True, exist_ok=True)
            self._pci_files(bridge, vendor="0x8086", pci_class="0x060400", numa_node=numa_node)
            self._bus_link(parts[depth - 1], bridge)
        dev = self.root / "devices" / path
        dev.mkdir(parents=True, exist_ok=True)
        self._pci_files(dev, vendor=vendor, pci_class=pci_class, numa_node=numa_node)
        self._bus_link(parts[-1], dev)
        return dev

    def gpu(self, path: str, *, numa_node: int = -1, pci_class: str = "0x030200") -> Path:
        dev = self.pci_device(path, vendor="0x10de", pci_class=pci_class, numa_node=numa_node)
        # The GPU's HDA audio function must not count as a GPU.
        self.pci_device(path[:-1] + "1", vendor="0x10de", pci_class="0x040300", numa_node=numa_node)
        return dev

    def nic(
        self,
        name: str,
        path: str,
        *,
        numa_node: int = -1,
        ports: dict[int, tuple[str, str, list[str]]] | None = None,
        netdev: str | None = None,
        kernel_layout: bool = False,
    ) -> Path:
        """``ports``: {port: (state, link_layer, gids)}; default one ACTIVE RoCE port with a GID.
        ``kernel_layout``: class/infiniband/<dev> is itself a symlink to <pci dev>/infiniband/<dev>,
        as the kernel makes it (the default keeps a plain directory there)."""
        dev = self.pci_device(path, vendor="0x15b3", pci_class="0x020000", numa_node=numa_node)
        ib = self.root / "class" / "infiniband" / name
        if kernel_layout:
            real = dev / "infiniband" / name
            real.mkdir(parents=True)
            os.symlink(os.path.relpath(real, ib.parent), ib)
        else:
            ib.mkdir(parents=True)
        os.symlink(os.path.relpath(dev, ib.resolve()), ib / "device")
        if netdev:
            (dev / "net" / netdev).mkdir(parents=True)
        default = {1: ("4: ACTIVE", "Ethernet", ["fe80:0000:0000:0000:0202:c9ff:fe00:0001", ZERO_GID])}
        for number, (state, link_layer, gids) in (ports or default).items():
            port = ib / "ports" / str(number)
            (port / "gids").mkdir(parents=True)
            (port / "state").write_text(state + "\n")
            (port / "phys_state").write_text("5: LinkUp\n" if "ACTIVE" in state else "3: Disabled\n")
            (port / "link_layer").write_text(link_layer + "\n")
            for index, gid in enumerate(gids):
                (port / "gids" / str(index)).write_text(gid + "\n")
        return dev

    def _pci_files(self, dev: Path, *, vendor: str, pci_class: str, numa_node: int) -> None:
        if not (dev / "vendor").exists():
            (dev / "vendor").write_text(vendor + "\n")
            (dev / "class").write_text(pci_class + "\n")
            (dev / "numa_node").write_text(f"{numa_node}\n")

    def _bus_link(self, bdf: str, dev: Path) -> None:
        link = self.root / "bus" / "pci" / "devices" / bdf
        if not link.is_symlink():
            os.symlink(os.path.relpath(dev, link.parent), link)


@pytest.fixture()
def sysfs(tmp_path: Path) -> SysfsTree:
    return SysfsTree(tmp_path / "sys")


# --------------------------------------------------------------------------- verbs backends

import ctypes  # noqa: E402
from collections.abc import Iterator  # noqa: E402

from rdma.connection import QPPolicy, RcConnection  # noqa: E402
from rdma.fake import FakeBackend, FakeFabric  # noqa: E402
from rdma.testing import pyverbs_backend_or_skip  # noqa: E402
from rdma.verbs import PortInfo, QPCaps, VerbsBackend, VerbsDevice  # noqa: E402


@pytest.fixture(params=["fake", pytest.param("pyverbs", marks=pytest.mark.rdma)])
def verbs(request: pytest.FixtureRequest) -> Iterator[tuple[VerbsDevice, PortInfo]]:
    """An opened device and its port 1, on the fake fabric or on real verbs."""
    if request.param == "fake":
        backend: VerbsBackend = FakeBackend(FakeFabric().add_device("fake0"))
        name = "fake0"
    else:
        backend, name = pyverbs_backend_or_skip()
    device = backend.open_device(name)
    try:
        yield device, device.query_port(1)
    finally:
        device.close()


class Buffer:
    """Caller-owned memory at a fixed address (what a KV cache tensor is to the backend)."""

    def __init__(self, num_bytes: int, fill: bytes = b"\0") -> None:
        self.raw = ctypes.create_string_buffer((fill * num_bytes)[:num_bytes], num_bytes)
        self.addr = ctypes.addressof(self.raw)
        self.length = num_bytes

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        length = self.length - offset if length is None else length
        return ctypes.string_at(self.addr + offset, length)


def connected_pair(
    device: VerbsDevice, port: PortInfo, *, caps: QPCaps | None = None, policy: QPPolicy | None = None
) -> tuple[RcConnection, RcConnection]:
    """Two RC QPs on one device, connected to each other (loopback), both in RTS."""
    a = RcConnection(device, port, caps=caps, policy=policy)
    b = RcConnection(device, port, caps=caps, policy=policy)
    a_end, b_end = a.local_endpoint(), b.local_endpoint()
    a.connect(b_end)
    b.connect(a_end)
    return a, b
