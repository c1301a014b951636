"""The verbs-level backend interface: the minimal set of ibverbs operations the transport uses.

Two implementations honour it, checked by ONE contract-test suite (tests/rdma/test_rdma_contract.py):
``rdma.fake`` (a protocol-level test double, runs everywhere) and ``rdma.pyverbs_backend``.

    VerbsBackend.open_device(name) -> VerbsDevice
        query_port(port) -> PortInfo
        register_memory(addr, length, access) -> MemoryRegion      deregister_memory(mr)
        register_dmabuf(fd, offset, length, access) -> MemoryRegion  (GPU memory; addressed by IOVA)
        create_qp(port, caps) -> QueuePair                        close()
    QueuePair (RC; one send CQ and one receive CQ of its own)
        to_init(InitAttrs) -> to_rtr(RtrAttrs) -> to_rts(RtsAttrs)   to_error()  to_reset()  destroy()
        post_send([WorkRequest])  post_recv([wr_id])  poll_send(n)  poll_recv(n)

Rules both backends enforce (in Python, before verbs sees them, so real and fake agree):
- transitions only RESET->INIT->RTR->RTS; any state -> RESET or ERROR (``to_error``: the revoke of a
  peer's access: a responder in ERROR places no more incoming WRITEs); post_send only in RTS (or ERROR, where
  the WRs complete with WR_FLUSH_ERR); post_recv in INIT, RTR, RTS;
- at most ``caps.max_send_wr`` send WRs outstanding; a WR's slot frees when a later-or-same
  signaled WR's completion is polled, or any error completion is polled (``SendQueueSlots``).
Values mirror libibverbs' numbers so a pyverbs completion maps 1:1.

Addresses: every SGE and remote address is in the MR's own address space, ``MemoryRegion.addr``
onwards. For ``register_memory`` that is the virtual address; for ``register_dmabuf`` it is the
IOVA, by default the dma-buf offset (pyverbs' DmaBufMR can do nothing else), so byte k of a
dma-buf MR registered at ``offset`` is at address ``offset + k``, whatever its virtual address.
"""

from __future__ import annotations

import abc
import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from rdma.errors import QueuePairStateError, SendQueueFullError


class QPState(enum.IntEnum):  # enum ibv_qp_state
    RESET = 0
    INIT = 1
    RTR = 2
    RTS = 3
    ERROR = 6


class Access(enum.IntFlag):  # enum ibv_access_flags
    LOCAL_WRITE = 1
    REMOTE_WRITE = 2
    REMOTE_READ = 4
    RELAXED_ORDERING = 1 << 20


class Opcode(enum.IntEnum):  # enum ibv_wr_opcode
    RDMA_WRITE = 0
    RDMA_WRITE_WITH_IMM = 1


class WcOpcode(enum.IntEnum):  # enum ibv_wc_opcode
    RDMA_WRITE = 1
    RECV_RDMA_WITH_IMM = 129


class WcStatus(enum.IntEnum):  # enum ibv_wc_status
    SUCCESS = 0
    LOC_LEN_ERR = 1
    LOC_QP_OP_ERR = 2
    LOC_EEC_OP_ERR = 3
    LOC_PROT_ERR = 4
    WR_FLUSH_ERR = 5
    MW_BIND_ERR = 6
    BAD_RESP_ERR = 7
    LOC_ACCESS_ERR = 8
    REM_INV_REQ_ERR = 9
    REM_ACCESS_ERR = 10
    REM_OP_ERR = 11
    RETRY_EXC_ERR = 12
    RNR_RETRY_EXC_ERR = 13
    LOC_RDD_VIOL_ERR = 14
    REM_INV_RD_REQ_ERR = 15
    REM_ABORT_ERR = 16
    INV_EECN_ERR = 17
    INV_EEC_STATE_ERR = 18
    FATAL_ERR = 19
    RESP_TIMEOUT_ERR = 20
    GENERAL_ERR = 21

    @classmethod
    def of(cls, value: int) -> WcStatus:
        try:
            return cls(value)
        except ValueError:
            return cls.GENERAL_ERR


class LinkLayer(enum.Enum):
    INFINIBAND = "InfiniBand"
    ETHERNET = "Ethernet"


MTU_BYTES = (256, 512, 1024, 2048, 4096)  # enum ibv_mtu: IBV_MTU_256 = 1 ... IBV_MTU_4096 = 5


def mtu_to_enum(mtu_bytes: int) -> int:
    return MTU_BYTES.index(mtu_bytes) + 1


def mtu_from_enum(value: int) -> int:
    return MTU_BYTES[int(value) - 1]


@dataclass(frozen=True)
class PortInfo:
    port_num: int
    is_active: bool
    link_layer: LinkLayer
    active_mtu_bytes: int
    lid: int  # 0 on Ethernet
    gid: str  # the chosen source GID, 8 colon-separated groups
    gid_index: int
    max_msg_bytes: int
    rate_gbps: float | None = None  # line rate from the port attributes, when known


@dataclass(frozen=True)
class MemoryRegion:
    """``addr`` is the address SGEs and peers use: the VA for ``register_memory``, the IOVA for
    ``register_dmabuf`` (see the module docstring)."""

    addr: int
    length: int
    lkey: int
    rkey: int
    access: Access

    def contains(self, addr: int, length: int) -> bool:
        return self.addr <= addr and addr + length <= self.addr + self.length


@dataclass(frozen=True)
class WorkRequest:
    """One single-SGE RDMA WRITE (or WRITE_WITH_IMM when ``imm_data`` is set)."""

    wr_id: int
    local_addr: int
    length: int
    lkey: int
    remote_addr: int
    rkey: int
    signaled: bool = False
    imm_data: int | None = None  # 32-bit, host order; the backend converts to network order

    @property
    def opcode(self) -> Opcode:
        return Opcode.RDMA_WRITE if self.imm_data is None else Opcode.RDMA_WRITE_WITH_IMM


@dataclass(frozen=True)
class Completion:
    wr_id: int
    status: WcStatus
    opcode: WcOpcode | None
    qpn: int
    imm_data: int | None = None

    @property
    def ok(self) -> bool:
        return self.status is WcStatus.SUCCESS


@dataclass(frozen=True)
class QPCaps:
    max_send_wr: int = 256
    max_recv_wr: int = 64


@dataclass(frozen=True)
class InitAttrs:
    port_num: int
    access: Access
    pkey_index: int = 0


@dataclass(frozen=True)
class RtrAttrs:
    path_mtu_bytes: int
    dest_qpn: int
    rq_psn: int
    max_dest_rd_atomic: int
    min_rnr_timer: int
    is_global: bool  # GRH: required on RoCE
    dgid: str | None
    sgid_index: int
    hop_limit: int
    traffic_class: int
    dlid: int  # InfiniBand: the peer's LID; 0 on RoCE
    port_num: int
    service_level: int = 0  # ah_attr.sl: the InfiniBand SL (RoCE maps it to a priority on some NICs)


@dataclass(frozen=True)
class RtsAttrs:
    sq_psn: int
    timeout: int
    retry_cnt: int
    rnr_retry: int
    max_rd_atomic: int


ALLOWED_TRANSITIONS = {
    QPState.INIT: (QPState.RESET,),
    QPState.RTR: (QPState.INIT,),
    QPState.RTS: (QPState.RTR,),
}


def check_transition(current: QPState, target: QPState, qpn: int) -> None:
    if target in (QPState.RESET, QPState.ERROR):
        return
    if current not in ALLOWED_TRANSITIONS[target]:
        raise QueuePairStateError(f"QP {qpn}: cannot go from {current.name} to {target.name}")


class SendQueueSlots:
    """Send-queue slot accounting shared by both backends (see the module rules).

    Verbs only frees an unsignaled WR's slot when a later signaled WR completes, so a sender that
    never signals fills the queue for good; tracking it here makes the rule testable everywhere.
    """

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self._outstanding: deque[int] = deque()  # wr_ids in post order

    @property
    def num_outstanding(self) -> int:
        return len(self._outstanding)

    @property
    def num_free(self) -> int:
        return self.depth - len(self._outstanding)

    def reserve(self, wrs: Sequence[WorkRequest], qpn: int) -> None:
        if len(wrs) > self.num_free:
            raise SendQueueFullError(
                f"QP {qpn}: posting {len(wrs)} WRs with {self.num_free} of {self.depth} send slots free"
            )
        self._outstanding.extend(wr.wr_id for wr in wrs)

    def retire(self, completion: Completion) -> None:
        """Free the slots up to and including ``completion.wr_id`` (all of them on an error)."""
        if not completion.ok:
            self._outstanding.clear()
            return
        while self._outstanding:
            if self._outstanding.popleft() == completion.wr_id:
                break

    def clear(self) -> None:
        self._outstanding.clear()


class QueuePair(abc.ABC):
    qpn: int
    state: QPState
    caps: QPCaps
    _slots: SendQueueSlots

    @property
    def num_free_send_slots(self) -> int:
        return self._slots.num_free

    @abc.abstractmethod
    def to_init(self, attrs: InitAttrs) -> None: ...

    @abc.abstractmethod
    def to_rtr(self, attrs: RtrAttrs) -> None: ...

    @abc.abstractmethod
    def to_rts(self, attrs: RtsAttrs) -> None: ...

    @abc.abstractmethod
    def to_error(self) -> None:
        """Any state -> ERROR: outstanding and later WRs flush, and as a responder the QP places no
        more incoming WRITEs (how D revokes a peer's access)."""

    @abc.abstractmethod
    def to_reset(self) -> None:
        """Back to RESET from any state; drops outstanding WRs (re-use after ERROR)."""

    @abc.abstractmethod
    def post_send(self, wrs: Sequence[WorkRequest]) -> None:
        """Post ``wrs`` in order as one chain. Raises QueuePairStateError, SendQueueFullError,
        VerbsCallError. Local and remote memory must stay valid until the completion."""

    @abc.abstractmethod
    def post_recv(self, wr_ids: Sequence[int]) -> None:
        """Post receives for WRITE_WITH_IMM notifications (no payload is received)."""

    @abc.abstractmethod
    def poll_send(self, max_entries: int) -> list[Completion]:
        """Non-blocking; retires send-queue slots for what it returns."""

    @abc.abstractmethod
    def poll_recv(self, max_entries: int) -> list[Completion]: ...

    @abc.abstractmethod
    def destroy(self) -> None: ...


class VerbsDevice(abc.ABC):
    name: str

    @property
    @abc.abstractmethod
    def num_ports(self) -> int:
        """Physical ports (ibv_device_attr.phys_port_cnt); they are numbered 1..num_ports."""

    @abc.abstractmethod
    def query_port(self, port_num: int) -> PortInfo: ...

    @abc.abstractmethod
    def register_memory(self, addr: int, length: int, access: Access) -> MemoryRegion:
        """Register caller-owned memory; the caller keeps it alive until ``deregister_memory``."""

    @abc.abstractmethod
    def register_dmabuf(
        self, fd: int, offset: int, length: int, access: Access, *, iova: int | None = None
    ) -> MemoryRegion:
        """Register ``length`` bytes of the dma-buf ``fd`` from ``offset`` (ibv_reg_dmabuf_mr): the
        path for GPU memory without nvidia-peermem. The MR is reached at ``iova`` (default: ``offset``,
        the only IOVA pyverbs' DmaBufMR offers; a backend that cannot honour another one raises).
        The fd may be closed once every device registered it: the MR holds the dma-buf itself.
        Raises VerbsCallError; ``errno_code`` EOPNOTSUPP or EINVAL means dma-buf MRs are not
        supported by this NIC/kernel (a caller may fall back to ``register_memory``)."""

    @abc.abstractmethod
    def deregister_memory(self, mr: MemoryRegion) -> None: ...

    @abc.abstractmethod
    def create_qp(self, port_num: int, caps: QPCaps) -> QueuePair:
        """An RC QP in RESET, selective signaling (sq_sig_all = 0), with its own CQs."""

    @abc.abstractmethod
    def close(self) -> None: ...


class VerbsBackend(abc.ABC):
    name: str

    @abc.abstractmethod
    def list_devices(self) -> list[str]:
        """Names of devices with at least one active port. Raises NoRdmaDeviceError when the
        verbs library itself cannot enumerate devices (no kernel RDMA support)."""

    @abc.abstractmethod
    def open_device(self, name: str) -> VerbsDevice: ...
