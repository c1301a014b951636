"""A protocol-level test double of the verbs backend: RC semantics in Python, bytes really copied.

It registers caller memory at its real address (so a KV cache tensor works unchanged) and performs
an RDMA WRITE as ``ctypes.memmove`` after the checks a NIC makes:

    check (in order)                                        failure -> completion status
    QP in RTS (post in ERROR: every WR flushes)              WR_FLUSH_ERR
    SGE inside a local MR with that lkey                     LOC_PROT_ERR
    peer QP exists at (dgid|dlid, dest_qpn), is RTR/RTS,     RETRY_EXC_ERR
      points back at us, and its rq_psn matches our sq_psn
    remote range inside a peer MR with that rkey, the MR     REM_ACCESS_ERR (peer QP -> ERROR too)
      and the peer QP allow REMOTE_WRITE
    WRITE_WITH_IMM: a receive is posted on the peer          RNR_RETRY_EXC_ERR

The first failing WR completes with its status (signaled or not), the QP goes to ERROR, and every
later WR (same chain or later posts) and every posted receive completes with WR_FLUSH_ERR.
Execution is synchronous at post time by default; completions wait in the CQs until polled.

Delayed DMA (``FakeFabric.dma_delay_s``): like a NIC, the fabric then reads the SOURCE bytes when
a WR executes, not when it is posted: a fabric thread runs each QP's WRs in order, each no earlier
than its post time plus the delay (a number, or a callable drawing one per WR), so a test can
change the source in between and see what the NIC would send. ``pause()``/``resume()`` hold the
DMA engine; ``wait_idle()`` waits until nothing is in flight. A responder moved to ERROR
(``to_error``: D revoking a peer) places nothing more; the WRITE completes RETRY_EXC_ERR at P.
Devices may have several ports (``add_device(..., ports={1: down, 2: active})``).

GPU memory is simulated with host buffers: ``FakeCudaDriver`` announces them as CUDA allocations
and exports them as dma-bufs (fake fd numbers, not OS fds). ``register_dmabuf`` then registers a
range of one at an IOVA (default: the offset, as pyverbs does), and every WRITE translates
MR-space addresses to host addresses, so a wrong IOVA/VA mix-up lands bytes in the wrong place or
fails with LOC_PROT_ERR / REM_ACCESS_ERR, as on a NIC. A plain ``register_memory`` of simulated GPU
memory fails with EFAULT unless ``FakeFabric.peermem_loaded`` (nvidia-peermem), and a device with
``FakePort.supports_dmabuf = False`` (like rxe) refuses dma-buf MRs with EOPNOTSUPP.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rdma.errors import NoRdmaDeviceError, QueuePairStateError, VerbsCallError
from rdma.fake_dma import FakeDmaEngine
from rdma.verbs import (
    Access,
    Completion,
    InitAttrs,
    LinkLayer,
    MemoryRegion,
    PortInfo,
    QPCaps,
    QPState,
    QueuePair,
    RtrAttrs,
    RtsAttrs,
    SendQueueSlots,
    VerbsBackend,
    VerbsDevice,
    WcOpcode,
    WcStatus,
    WorkRequest,
    check_transition,
)


@dataclass(frozen=True)
class FakePort:
    link_layer: LinkLayer = LinkLayer.ETHERNET
    active_mtu_bytes: int = 1024
    lid: int = 0
    gid: str = "0000:0000:0000:0000:0000:ffff:0a00:0001"
    max_msg_bytes: int = 1 << 30
    is_active: bool = True
    rate_gbps: float = 100.0
    supports_dmabuf: bool = True  # ibv_reg_dmabuf_mr works on this device (rxe: no)


class FakeFabric:
    """The 'network': devices by name, and QPs by address so a WRITE can find its responder."""

    def __init__(self, *, dma_delay_s: float | Callable[[], float] | None = None) -> None:
        self.lock = threading.RLock()  # one lock for the whole fabric: a WRITE touches two QPs
        self.ports: dict[str, FakePort] = {}  # the device's first port (addressing of old tests)
        self.device_ports: dict[str, dict[int, FakePort]] = {}
        self.dma_delay_s = dma_delay_s
        self.dma = FakeDmaEngine(self.lock, dma_delay_s)
        self._qps: dict[tuple[str, int], FakeQueuePair] = {}
        self._qpn = itertools.count(0x100)
        self._key = itertools.count(0x1000)
        self.peermem_loaded = True  # nvidia-peermem: plain ibv_reg_mr accepts GPU memory
        self.gpu_allocations: list[tuple[int, int]] = []  # simulated CUDA allocations (host addr, bytes)
        self.dmabufs: dict[int, tuple[int, int]] = {}  # open fake fd -> (host addr, bytes) it exports
        self._fd = itertools.count(1000)

    def add_device(
        self, name: str, port: FakePort | None = None, *, ports: dict[int, FakePort] | None = None
    ) -> FakeFabric:
        default = FakePort(gid=f"0000:0000:0000:0000:0000:ffff:0a00:{len(self.ports) + 1:04x}")
        numbered = ports or {1: port or default}
        self.device_ports[name] = numbered
        self.ports[name] = numbered[min(numbered)]
        return self

    # ------------------------------------------------------------------ delayed DMA (rdma.fake_dma)

    def schedule(self, qp: FakeQueuePair, wr: WorkRequest) -> None:
        self.dma.schedule(qp, wr)

    def pause(self) -> None:
        """Hold the DMA engine: posted WRs wait (their source is read when it resumes)."""
        self.dma.pause()

    def resume(self) -> None:
        self.dma.resume()

    @property
    def num_in_flight(self) -> int:
        return self.dma.num_in_flight

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """Wait until no WR is queued or executing. True when idle."""
        return self.dma.wait_idle(timeout_s)

    def next_qpn(self) -> int:
        return next(self._qpn)

    def next_key(self) -> int:
        return next(self._key)

    def is_gpu_memory(self, addr: int, length: int) -> bool:
        return any(base < addr + length and addr < base + size for base, size in self.gpu_allocations)

    def export_dmabuf(self, addr: int, length: int) -> int:
        with self.lock:
            fd = next(self._fd)
            self.dmabufs[fd] = (addr, length)
        return fd

    def close_dmabuf(self, fd: int) -> None:
        with self.lock:
            self.dmabufs.pop(fd, None)

    @staticmethod
    def address(port: FakePort, qpn: int) -> tuple[str, int]:
        return (port.gid if port.link_layer is LinkLayer.ETHERNET else f"lid:{port.lid}", qpn)

    def attach(self, qp: FakeQueuePair) -> None:
        self._qps[self.address(qp.port, qp.qpn)] = qp

    def detach(self, qp: FakeQueuePair) -> None:
        self._qps.pop(self.address(qp.port, qp.qpn), None)

    def lookup(self, rtr: RtrAttrs) -> FakeQueuePair | None:
        key = (
            (rtr.dgid or "", rtr.dest_qpn)
            if rtr.is_global and rtr.dlid == 0
            else (f"lid:{rtr.dlid}", rtr.dest_qpn)
        )
        return self._qps.get(key)


class FakeBackend(VerbsBackend):
    name = "fake"

    def __init__(self, fabric: FakeFabric) -> None:
        self.fabric = fabric

    def list_devices(self) -> list[str]:
        return sorted(name for name, port in self.fabric.ports.items() if port.is_active)

    def open_device(self, name: str) -> FakeDevice:
        if name not in self.fabric.ports:
            raise NoRdmaDeviceError(f"no RDMA device named {name!r}", device=name)
        return FakeDevice(self.fabric, name)


class FakeDevice(VerbsDevice):
    """One opened context with one protection domain: its MRs are what its QPs can reach."""

    def __init__(self, fabric: FakeFabric, name: str) -> None:
        self.fabric = fabric
        self.name = name
        self.port = fabric.ports[name]
        self.ports_by_num = fabric.device_ports[name]
        self.mrs: dict[int, MemoryRegion] = {}  # by key (lkey == rkey here)
        self.host_addrs: dict[int, int] = {}  # by key: the host address of the MR's first byte

    @property
    def num_ports(self) -> int:
        return max(self.ports_by_num)

    def query_port(self, port_num: int) -> PortInfo:
        p = self.ports_by_num.get(port_num)
        if p is None:
            raise VerbsCallError(f"port {port_num} does not exist", device=self.name)
        return PortInfo(
            port_num,
            p.is_active,
            p.link_layer,
            p.active_mtu_bytes,
            p.lid,
            p.gid,
            0,
            p.max_msg_bytes,
            p.rate_gbps,
        )

    def register_memory(self, addr: int, length: int, access: Access) -> MemoryRegion:
        if addr <= 0 or length <= 0:
            raise VerbsCallError(f"cannot register {length} bytes at {addr:#x}", device=self.name)
        self._check_access(access)
        if self.fabric.is_gpu_memory(addr, length) and not self.fabric.peermem_loaded:
            raise VerbsCallError(
                f"ibv_reg_mr of GPU memory at {addr:#x} without nvidia-peermem (EFAULT)",
                errno_code=errno.EFAULT,
                device=self.name,
            )
        return self._add(MemoryRegion(addr, length, 0, 0, access), host_addr=addr)

    def register_dmabuf(
        self, fd: int, offset: int, length: int, access: Access, *, iova: int | None = None
    ) -> MemoryRegion:
        self._check_access(access)
        if not self.port.supports_dmabuf:
            raise VerbsCallError(
                "ibv_reg_dmabuf_mr: not supported by this device (EOPNOTSUPP)",
                errno_code=errno.EOPNOTSUPP,
                device=self.name,
            )
        with self.fabric.lock:
            exported = self.fabric.dmabufs.get(fd)
        if exported is None:
            raise VerbsCallError(
                f"ibv_reg_dmabuf_mr: fd {fd} is not an open dma-buf (EBADF)",
                errno_code=errno.EBADF,
                device=self.name,
            )
        host_addr, size = exported
        if offset < 0 or length <= 0 or offset + length > size:
            raise VerbsCallError(
                f"ibv_reg_dmabuf_mr: [{offset:#x}, +{length}) is outside the {size}-byte dma-buf (EINVAL)",
                errno_code=errno.EINVAL,
                device=self.name,
            )
        mr = MemoryRegion(offset if iova is None else iova, length, 0, 0, access)
        return self._add(mr, host_addr=host_addr + offset)

    def _check_access(self, access: Access) -> None:
        if access & (Access.REMOTE_WRITE | Access.REMOTE_READ) and not access & Access.LOCAL_WRITE:
            raise VerbsCallError(
                "REMOTE_WRITE needs LOCAL_WRITE (EINVAL)", errno_code=errno.EINVAL, device=self.name
            )

    def _add(self, template: MemoryRegion, *, host_addr: int) -> MemoryRegion:
        with self.fabric.lock:
            key = self.fabric.next_key()
            mr = MemoryRegion(template.addr, template.length, key, key, template.access)
            self.mrs[key] = mr
            self.host_addrs[key] = host_addr
        return mr

    def host_address(self, key: int, addr: int) -> int:
        """Where MR-space ``addr`` of the MR with ``key`` lives in host memory."""
        return self.host_addrs[key] + (addr - self.mrs[key].addr)

    def deregister_memory(self, mr: MemoryRegion) -> None:
        with self.fabric.lock:
            self.mrs.pop(mr.lkey, None)
            self.host_addrs.pop(mr.lkey, None)

    def create_qp(self, port_num: int, caps: QPCaps) -> FakeQueuePair:
        if port_num not in self.ports_by_num:
            raise VerbsCallError(f"port {port_num} does not exist", device=self.name)
        with self.fabric.lock:
            qp = FakeQueuePair(self, self.fabric.next_qpn(), caps, port_num)
            self.fabric.attach(qp)
        return qp

    def close(self) -> None:
        self.mrs.clear()
        self.host_addrs.clear()


class FakeQueuePair(QueuePair):
    def __init__(self, device: FakeDevice, qpn: int, caps: QPCaps, port_num: int = 1) -> None:
        self.device = device
        self.port = device.ports_by_num[port_num]
        self.last_due = 0.0  # delayed DMA: this QP's WRs run in post order
        self.destroyed = False
        self.qpn = qpn
        self.caps = caps
        self.state = QPState.RESET
        self.access = Access(0)
        self.rtr: RtrAttrs | None = None
        self.rts: RtsAttrs | None = None
        self.next_send_psn = 0
        self.expected_recv_psn = 0
        self._slots = SendQueueSlots(caps.max_send_wr)
        self._send_cq: deque[Completion] = deque()
        self._recv_cq: deque[Completion] = deque()
        self._posted_recvs: deque[int] = deque()
        self._lock = device.fabric.lock

    # ------------------------------------------------------------------ state machine

    def to_init(self, attrs: InitAttrs) -> None:
        with self._lock:
            check_transition(self.state, QPState.INIT, self.qpn)
            self.access = attrs.access
            self.state = QPState.INIT

    def to_rtr(self, attrs: RtrAttrs) -> None:
        with self._lock:
            check_transition(self.state, QPState.RTR, self.qpn)
            if attrs.path_mtu_bytes > self.port.active_mtu_bytes:
                raise VerbsCallError(
                    f"path MTU {attrs.path_mtu_bytes} above the port's active MTU (EINVAL)",
                    device=self.device.name,
                )
            if self.port.link_layer is LinkLayer.ETHERNET and not (attrs.is_global and attrs.dgid):
                raise VerbsCallError("RoCE needs a GRH (is_global, dgid) (EINVAL)", device=self.device.name)
            self.rtr = attrs
            self.expected_recv_psn = attrs.rq_psn
            self.state = QPState.RTR

    def to_rts(self, attrs: RtsAttrs) -> None:
        with self._lock:
            check_transition(self.state, QPState.RTS, self.qpn)
            self.rts = attrs
            self.next_send_psn = attrs.sq_psn
            self.state = QPState.RTS

    def to_error(self) -> None:
        with self._lock:
            self._enter_error()

    def to_reset(self) -> None:
        with self._lock:
            self.state = QPState.RESET
            self.rtr = self.rts = None
            self._slots.clear()
            self._send_cq.clear()
            self._recv_cq.clear()
            self._posted_recvs.clear()

    def destroy(self) -> None:
        with self._lock:
            self.to_reset()
            self.destroyed = True  # delayed WRs still queued for it are dropped
            self.device.fabric.detach(self)

    # ------------------------------------------------------------------ data path

    def post_recv(self, wr_ids: Sequence[int]) -> None:
        with self._lock:
            if self.state not in (QPState.INIT, QPState.RTR, QPState.RTS, QPState.ERROR):
                raise QueuePairStateError(f"QP {self.qpn}: post_recv in {self.state.name}")
            if len(self._posted_recvs) + len(wr_ids) > self.caps.max_recv_wr:
                raise VerbsCallError(f"QP {self.qpn}: receive queue full", device=self.device.name)
            if self.state is QPState.ERROR:
                self._recv_cq.extend(Completion(w, WcStatus.WR_FLUSH_ERR, None, self.qpn) for w in wr_ids)
                return
            self._posted_recvs.extend(wr_ids)

    def post_send(self, wrs: Sequence[WorkRequest]) -> None:
        with self._lock:
            if self.state not in (QPState.RTS, QPState.ERROR):
                raise QueuePairStateError(f"QP {self.qpn}: post_send in {self.state.name}")
            self._slots.reserve(wrs, self.qpn)
            for wr in wrs:
                if self.device.fabric.dma_delay_s is not None:
                    self.device.fabric.schedule(self, wr)  # the NIC reads the source later
                    continue
                if self.state is QPState.ERROR:
                    self._send_cq.append(Completion(wr.wr_id, WcStatus.WR_FLUSH_ERR, None, self.qpn))
                    continue
                self._execute_and_complete(wr)

    def run_deferred(self, wr: WorkRequest) -> None:
        """The delayed DMA engine executes ``wr`` now (reading its source now)."""
        with self._lock:
            if self.destroyed:
                return
            if self.state is not QPState.RTS:
                self._send_cq.append(Completion(wr.wr_id, WcStatus.WR_FLUSH_ERR, None, self.qpn))
                return
            self._execute_and_complete(wr)

    def _execute_and_complete(self, wr: WorkRequest) -> None:
        """Under ``_lock``: run ``wr``; a failure completes it with its status and breaks the QP,
        a success completes it only when signaled (as a real send queue does)."""
        status = self._execute(wr)
        if status is not WcStatus.SUCCESS:
            self._send_cq.append(Completion(wr.wr_id, status, None, self.qpn))
            self._enter_error()
        elif wr.signaled:
            self._send_cq.append(Completion(wr.wr_id, status, WcOpcode.RDMA_WRITE, self.qpn))

    def poll_send(self, max_entries: int) -> list[Completion]:
        with self._lock:
            out = [self._send_cq.popleft() for _ in range(min(max_entries, len(self._send_cq)))]
            for completion in out:
                self._slots.retire(completion)
            return out

    def poll_recv(self, max_entries: int) -> list[Completion]:
        with self._lock:
            return [self._recv_cq.popleft() for _ in range(min(max_entries, len(self._recv_cq)))]

    @property
    def num_posted_recvs(self) -> int:
        return len(self._posted_recvs)

    def _execute(self, wr: WorkRequest) -> WcStatus:
        local = self.device.mrs.get(wr.lkey)
        if local is None or not local.contains(wr.local_addr, wr.length):
            return WcStatus.LOC_PROT_ERR
        assert self.rtr is not None
        peer = self.device.fabric.lookup(self.rtr)
        if peer is None or peer.state not in (QPState.RTR, QPState.RTS) or peer.rtr is None:
            return WcStatus.RETRY_EXC_ERR
        if peer.rtr.dest_qpn != self.qpn or peer.expected_recv_psn != self.next_send_psn:
            return WcStatus.RETRY_EXC_ERR  # the responder drops packets it does not expect
        remote = peer.device.mrs.get(wr.rkey)
        if (
            remote is None
            or not remote.contains(wr.remote_addr, wr.length)
            or not remote.access & Access.REMOTE_WRITE
            or not peer.access & Access.REMOTE_WRITE
        ):
            peer._enter_error()
            return WcStatus.REM_ACCESS_ERR
        if wr.imm_data is not None and not peer._posted_recvs:
            return WcStatus.RNR_RETRY_EXC_ERR
        if wr.length:
            dst = peer.device.host_address(wr.rkey, wr.remote_addr)
            ctypes.memmove(dst, self.device.host_address(wr.lkey, wr.local_addr), wr.length)
        packets = max(1, -(-wr.length // self.rtr.path_mtu_bytes))
        self.next_send_psn = (self.next_send_psn + packets) % (1 << 24)
        peer.expected_recv_psn = (peer.expected_recv_psn + packets) % (1 << 24)
        if wr.imm_data is not None:
            recv_id = peer._posted_recvs.popleft()
            peer._recv_cq.append(
                Completion(
                    recv_id, WcStatus.SUCCESS, WcOpcode.RECV_RDMA_WITH_IMM, peer.qpn, wr.imm_data & 0xFFFFFFFF
                )
            )
        return WcStatus.SUCCESS

    def _enter_error(self) -> None:
        self.state = QPState.ERROR
        self._recv_cq.extend(Completion(w, WcStatus.WR_FLUSH_ERR, None, self.qpn) for w in self._posted_recvs)
        self._posted_recvs.clear()


# The simulated CUDA driver lives in rdma/fake_cuda.py (kept importable from here).
from rdma.fake_cuda import FakeCudaDriver as FakeCudaDriver  # noqa: E402
