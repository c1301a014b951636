"""Which RDMA NICs to use, decided from sysfs. The one implementation: tools/get_rdma_nics.sh is a
thin wrapper around ``python -m rdma.nics`` (same arguments, output and exit status).

Rules:

- a port counts when ``ports/<n>/state`` says ACTIVE and it can carry RC traffic: InfiniBand, or
  Ethernet (RoCE) with at least one non-zero GID (an all-zero table means no IP on the netdev);
- ``cpu`` mode: every device with an active port, in name order (natural: mlx5_2 before mlx5_10);
- ``gpu`` mode: one entry per NVIDIA GPU (vendor 0x10de, class 0x0300xx/0x0302xx) in PCI-address
  order, the nearest active NIC: deepest common PCIe ancestor, then same NUMA node, then name order.

PCIe distance is measured on the realpath of the device directory below ``<sysfs>/devices``::

    GPU  pci0000:00 / 0000:00:01.0 / 0000:01:00.0 / 0000:02:00.0 / 0000:03:00.0
    NIC  pci0000:00 / 0000:00:01.0 / 0000:01:00.0 / 0000:02:01.0 / 0000:04:00.0
         `------------ common depth 3 (behind the same switch) ---------'

``resolve_nics`` honours ``KVCACHE_RDMA_NICS`` when it is set, and detects otherwise. With
``stripe`` (``--stripe``) each GPU's entry lists EVERY NIC tied for nearest, joined by ``+``
(``mlx5_0+mlx5_1``): the transport stripes that GPU's requests over all of them.

GPU indices: entry i serves physical GPU i (PCI order). A process sees GPUs through
``CUDA_VISIBLE_DEVICES``; ``physical_gpu_index`` maps its logical index back (``CUDA_VISIBLE_DEVICES=2,3``:
logical 0 is physical 2). Integer entries only: with UUID/MIG entries, set ``KVCACHE_RDMA_NICS``
for the visible GPUs yourself. (CUDA numbers GPUs in PCI order only with
``CUDA_DEVICE_ORDER=PCI_BUS_ID``; when torch can tell the GPU's PCI address we use that instead.)
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rdma.errors import NicDetectionError

Mode = Literal["cpu", "gpu"]

ENV_NICS = "KVCACHE_RDMA_NICS"
ENV_CUDA_VISIBLE = "CUDA_VISIBLE_DEVICES"
STRIPE_SEPARATOR = "+"
ENV_SYSFS_ROOT = "SYSFS_ROOT"
NVIDIA_VENDOR = "0x10de"
GPU_CLASS_PREFIXES = ("0x0300", "0x0302")  # VGA controller, 3D controller
ZERO_GID = "0000:0000:0000:0000:0000:0000:0000:0000"


@dataclass(frozen=True)
class RdmaPort:
    number: int
    state: str  # the kernel's text, e.g. "4: ACTIVE"
    link_layer: str  # "InfiniBand" or "Ethernet"
    num_nonzero_gids: int

    @property
    def is_active(self) -> bool:
        if "ACTIVE" not in self.state:
            return False
        if self.link_layer == "InfiniBand":
            return True
        return self.link_layer == "Ethernet" and self.num_nonzero_gids > 0


@dataclass(frozen=True)
class RdmaNic:
    name: str
    ports: tuple[RdmaPort, ...]
    pci_path: tuple[str, ...]  # components below <sysfs>/devices; () when unknown
    numa_node: int  # -1 when unknown
    netdevs: tuple[str, ...]

    @property
    def is_active(self) -> bool:
        return any(port.is_active for port in self.ports)

    @property
    def active_ports(self) -> tuple[int, ...]:
        return tuple(port.number for port in self.ports if port.is_active)


@dataclass(frozen=True)
class Gpu:
    pci_address: str  # e.g. 0000:03:00.0
    pci_path: tuple[str, ...]
    numa_node: int


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders digit runs by value (mlx5_2 < mlx5_10), like `sort -V` on such names."""
    return tuple((1, int(part)) if part.isdigit() else (0, part) for part in re.split(r"(\d+)", name) if part)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # gid_attrs entries of unused GIDs fail with EINVAL; absent files are just absent
        return None


def _pci_path(device: Path, sysfs_root: Path) -> tuple[str, ...]:
    devices_dir = (sysfs_root / "devices").resolve()
    try:
        return device.resolve(strict=True).relative_to(devices_dir).parts
    except (OSError, ValueError):
        return ()


def _numa_node(device: Path) -> int:
    text = _read(device / "numa_node")
    try:
        return int(text) if text is not None else -1
    except ValueError:
        return -1


def _read_port(port_dir: Path) -> RdmaPort:
    gids = [_read(gid) for gid in sorted((port_dir / "gids").glob("*"))]
    return RdmaPort(
        number=int(port_dir.name),
        state=_read(port_dir / "state") or "",
        link_layer=_read(port_dir / "link_layer") or "",
        num_nonzero_gids=sum(1 for gid in gids if gid and gid != ZERO_GID),
    )


def list_nics(sysfs_root: Path) -> list[RdmaNic]:
    """Every RDMA device under class/infiniband (active or not), in name order."""
    nics: list[RdmaNic] = []
    for dev_dir in sorted((sysfs_root / "class" / "infiniband").glob("*"), key=lambda p: natural_key(p.name)):
        ports_dir = dev_dir / "ports"
        if not ports_dir.is_dir():
            continue
        ports = tuple(_read_port(p) for p in sorted(ports_dir.iterdir(), key=lambda p: natural_key(p.name)))
        device = dev_dir / "device"
        netdev_dir = device / "net"
        nics.append(
            RdmaNic(
                name=dev_dir.name,
                ports=ports,
                pci_path=_pci_path(device, sysfs_root),
                numa_node=_numa_node(device),
                netdevs=tuple(sorted(p.name for p in netdev_dir.iterdir())) if netdev_dir.is_dir() else (),
            )
        )
    return nics


def list_gpus(sysfs_root: Path) -> list[Gpu]:
    """NVIDIA display/3D controllers under bus/pci/devices, in PCI-address order."""
    gpus: list[Gpu] = []
    for dev in sorted((sysfs_root / "bus" / "pci" / "devices").glob("*"), key=lambda p: p.name):
        if _read(dev / "vendor") != NVIDIA_VENDOR:
            continue
        if not (_read(dev / "class") or "").startswith(GPU_CLASS_PREFIXES):
            continue
        gpus.append(Gpu(pci_address=dev.name, pci_path=_pci_path(dev, sysfs_root), numa_node=_numa_node(dev)))
    return gpus


def common_depth(a: Sequence[str], b: Sequence[str]) -> int:
    depth = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        depth += 1
    return depth


def _rank(gpu: Gpu, nic: RdmaNic) -> tuple[int, int]:
    same_numa = gpu.numa_node >= 0 and gpu.numa_node == nic.numa_node
    return (-common_depth(gpu.pci_path, nic.pci_path), 0 if same_numa else 1)


def nearest_nic(gpu: Gpu, nics: Sequence[RdmaNic]) -> RdmaNic:
    """The NIC closest to ``gpu``: deepest common PCIe ancestor, then same NUMA node, then name."""
    return nearest_nics(gpu, nics)[0]


def nearest_nics(gpu: Gpu, nics: Sequence[RdmaNic]) -> list[RdmaNic]:
    """Every NIC tied for closest to ``gpu`` (same rank as the nearest), in name order."""
    if not nics:
        raise NicDetectionError("no active RDMA NIC to choose from")
    best = min(_rank(gpu, nic) for nic in nics)
    return [nic for nic in nics if _rank(gpu, nic) == best]  # ``nics`` is in name order


def detect_nics(mode: Mode, sysfs_root: Path | None = None, *, stripe: bool = False) -> list[str]:
    """NIC names per the module rules (``stripe``: gpu entries list all nearest NICs, joined by
    ``+``). Raises NicDetectionError when nothing qualifies."""
    root = sysfs_root if sysfs_root is not None else Path(os.environ.get(ENV_SYSFS_ROOT, "/sys"))
    active = [nic for nic in list_nics(root) if nic.is_active]
    if not active:
        raise NicDetectionError(f"no RDMA device with an active port under {root / 'class' / 'infiniband'}")
    if mode == "cpu":
        return [nic.name for nic in active]
    if mode != "gpu":
        raise ValueError(f"mode: expected 'cpu' or 'gpu', got {mode!r}")
    gpus = list_gpus(root)
    if not gpus:
        raise NicDetectionError(
            f"no NVIDIA GPU (vendor 0x10de, class 0x0300/0x0302) under {root / 'bus' / 'pci' / 'devices'}"
        )
    if stripe:
        return [STRIPE_SEPARATOR.join(n.name for n in nearest_nics(gpu, active)) for gpu in gpus]
    return [nearest_nic(gpu, active).name for gpu in gpus]


def physical_gpu_index(logical: int, env: Mapping[str, str] | None = None) -> int:
    """The physical (PCI-order) index of the process's CUDA device ``logical``."""
    environ = os.environ if env is None else env
    value = environ.get(ENV_CUDA_VISIBLE)
    if value is None or not value.strip():
        return logical
    entries = [entry.strip() for entry in value.split(",") if entry.strip()]
    if logical >= len(entries):
        raise NicDetectionError(f"{ENV_CUDA_VISIBLE}={value!r} shows no GPU {logical}")
    entry = entries[logical]
    if not entry.isdigit():
        raise NicDetectionError(
            f"{ENV_CUDA_VISIBLE} entry {entry!r} is not a GPU index (UUID or MIG id): set "
            f"{ENV_NICS} to one entry per visible GPU"
        )
    return int(entry)


def nics_for_gpu(
    logical: int,
    *,
    env: Mapping[str, str] | None = None,
    sysfs_root: Path | None = None,
    pci_address: str | None = None,
) -> list[str]:
    """The NICs a CUDA KV cache on logical GPU ``logical`` should stripe over.

    ``KVCACHE_RDMA_NICS`` set: its entry for the GPU (index modulo the list length, FastDeploy's
    convention; an entry may name several NICs joined by ``+``). Otherwise detection: every active
    NIC tied for nearest to that GPU, found by ``pci_address`` when known, else by its physical
    index (``CUDA_VISIBLE_DEVICES`` applied)."""
    environ = os.environ if env is None else env
    configured = environ.get(ENV_NICS, "").strip()
    if configured:
        entries = parse_nic_list(configured)
        return entries[physical_gpu_index(logical, environ) % len(entries)].split(STRIPE_SEPARATOR)
    root = sysfs_root if sysfs_root is not None else Path(environ.get(ENV_SYSFS_ROOT, "/sys"))
    active = [nic for nic in list_nics(root) if nic.is_active]
    gpus = list_gpus(root)
    if not active or not gpus:
        detect_nics("gpu", root)  # raises the explanation
    by_address = [g for g in gpus if pci_address is not None and g.pci_address.lower() == pci_address.lower()]
    if by_address:
        gpu = by_address[0]
    else:
        index = physical_gpu_index(logical, environ)
        if index >= len(gpus):
            raise NicDetectionError(f"GPU {index} not found: {len(gpus)} NVIDIA GPUs under {root}")
        gpu = gpus[index]
    return [nic.name for nic in nearest_nics(gpu, active)]


def parse_nic_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise ValueError(f"{ENV_NICS}: expected a comma-separated list of RDMA device names, got {value!r}")
    return names


def resolve_nics(
    mode: Mode = "gpu",
    *,
    env: Mapping[str, str] | None = None,
    sysfs_root: Path | None = None,
    stripe: bool = False,
) -> list[str]:
    """``KVCACHE_RDMA_NICS`` when set and non-empty; otherwise ``detect_nics(mode)``."""
    environ = os.environ if env is None else env
    value = environ.get(ENV_NICS, "").strip()
    if value:
        return parse_nic_list(value)
    if sysfs_root is None and ENV_SYSFS_ROOT in environ:
        sysfs_root = Path(environ[ENV_SYSFS_ROOT])
    return detect_nics(mode, sysfs_root, stripe=stripe)


def format_env_line(names: Sequence[str]) -> str:
    return f"{ENV_NICS}={','.join(names)}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rdma.nics cpu|gpu [--stripe]`` (tools/get_rdma_nics.sh runs exactly this):
    prints ``KVCACHE_RDMA_NICS=...``; exit 1 with the reason on stderr when nothing qualifies,
    2 on bad usage. Reads ``$SYSFS_ROOT`` (default /sys)."""
    args = list(sys.argv[1:] if argv is None else argv)
    stripe = "--stripe" in args
    args = [a for a in args if a != "--stripe"]
    if len(args) != 1 or args[0] not in ("cpu", "gpu"):
        print("get_rdma_nics: usage: get_rdma_nics.sh cpu|gpu [--stripe]", file=sys.stderr)
        return 2
    try:
        names = detect_nics(args[0], stripe=stripe)  # type: ignore[arg-type]
    except NicDetectionError as exc:
        print(f"get_rdma_nics: {exc}", file=sys.stderr)
        return 1
    print(format_env_line(names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
