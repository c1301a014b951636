"""The real verbs backend, over pyverbs (rdma-core's Cython bindings), imported lazily.

Works with Debian 12's python3-pyverbs (rdma-core 44, ``pyverbs.enums``) and rdma-core >= 59
(``pyverbs.libibverbs_enums``). pyverbs pitfalls designed around (see docs/rdma.md):
- QPInitAttr defaults to UD with sq_sig_all=1 and QPCap to max_send_wr=1: both set explicitly;
- QPAttr defaults (access 0, timeout/retries 0) and GlobalRoute's hop_limit=1: set from QPPolicy;
- chained SendWRs are not kept alive by pyverbs, and SGE/SendWR leak unless closed: we hold them
  until post_send returns, then close each exactly once;
- RecvWR needs an SGE on rdma-core 44: receives point at a 64-byte scratch MR;
- get_device_list() raises (errno dropped) without kernel support: explained from sysfs;
- DmaBufMR registers with iova = the dma-buf offset (not the GPU VA) and reports buf = 0: the
  MemoryRegion we return carries that offset as its address (rdma.verbs, rdma.gpu_memory).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

from rdma.errors import NoRdmaDeviceError, PyverbsUnavailableError, QueuePairStateError, VerbsCallError
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
    mtu_from_enum,
    mtu_to_enum,
)

ZERO_GID = "0000:0000:0000:0000:0000:0000:0000:0000"
# Per-lane Gb/s of ibv_port_attr.active_speed, times lanes of active_width: the line rate.
_SPEED_GBPS = {
    1: 2.5,
    2: 5.0,
    4: 10.0,
    8: 10.3125,
    16: 14.0625,
    32: 25.78125,
    64: 53.125,
    128: 106.25,
    256: 212.5,
}
_WIDTH_LANES = {1: 1, 2: 4, 4: 8, 8: 12, 16: 2}


def load_pyverbs() -> Any:
    """Import pyverbs and return a namespace of the modules used. Raises PyverbsUnavailableError."""
    try:
        import pyverbs.addr as addr
        import pyverbs.cq as cq
        import pyverbs.device as device
        import pyverbs.mr as mr
        import pyverbs.pd as pd
        import pyverbs.qp as qp
        import pyverbs.wr as wr
        from pyverbs.pyverbs_error import PyverbsError
    except ImportError as exc:
        raise PyverbsUnavailableError(
            f"pyverbs is not importable ({exc}); on Debian/Ubuntu: apt-get install python3-pyverbs, "
            "then tools/link_system_pyverbs.sh <venv>"
        ) from None
    try:
        import pyverbs.libibverbs_enums as enums  # rdma-core >= 59
    except ImportError:
        import pyverbs.enums as enums  # rdma-core 44 (Debian 12)

    class Namespace:
        pass

    ns: Any = Namespace()
    ns.addr, ns.cq, ns.device, ns.mr, ns.pd, ns.qp, ns.wr, ns.e = addr, cq, device, mr, pd, qp, wr, enums
    ns.Error = PyverbsError
    return ns


def explain_no_devices(sysfs_root: str = "/sys") -> str:
    ib = os.path.join(sysfs_root, "class", "infiniband")
    if not os.path.isdir(ib):
        return (
            f"the kernel has no RDMA support or no RDMA driver loaded ({ib} does not exist); "
            "load the NIC driver (mlx5_ib, ...) or Soft-RoCE: modprobe rdma_rxe && rdma link add rxe0 type rxe netdev <if>"
        )
    if not os.listdir(ib):
        return f"no RDMA devices ({ib} is empty)"
    if not os.path.isdir(os.path.join(sysfs_root, "class", "infiniband_verbs")):
        return "RDMA devices exist but user-space verbs are unavailable (ib_uverbs not loaded, or /dev/infiniband not passed into the container)"
    return (
        "libibverbs could not list the devices (check /dev/infiniband permissions and the provider library)"
    )


def errno_of(exc: BaseException) -> int | None:
    """The errno a PyverbsRDMAError carries, when it carries one (some calls report -1)."""
    code = getattr(exc, "error_code", -1)
    return code if isinstance(code, int) and code > 0 else None


def build_qp_attr(
    pv: Any, target: QPState, fields: dict[str, Any], mask_names: Sequence[str]
) -> tuple[Any, int]:
    """A pyverbs QPAttr with ``fields`` set and the ibv_modify_qp mask naming exactly them."""
    attr = pv.qp.QPAttr()
    attr.qp_state = int(target)
    for key, value in fields.items():
        setattr(attr, key, value)
    mask = int(pv.e.ibv_qp_attr_mask.IBV_QP_STATE)
    for name in mask_names:
        mask |= int(getattr(pv.e.ibv_qp_attr_mask, name))
    return attr, mask


class PyverbsBackend(VerbsBackend):
    name = "pyverbs"

    def __init__(self, gid_index: int | None = None) -> None:
        self.pv = load_pyverbs()
        self.gid_index = gid_index

    def list_devices(self) -> list[str]:
        pv = self.pv
        try:
            devices = pv.device.get_device_list()
        except pv.Error as exc:
            raise NoRdmaDeviceError(f"cannot list RDMA devices: {explain_no_devices()} [{exc}]") from None
        names: list[str] = []
        for dev in devices:
            name = dev.name.decode()
            with pv.device.Context(name=name) as ctx:
                num_ports = ctx.query_device().phys_port_cnt
                if any(
                    ctx.query_port(p).state == pv.e.ibv_port_state.IBV_PORT_ACTIVE
                    for p in range(1, num_ports + 1)
                ):
                    names.append(name)
        return sorted(names)

    def open_device(self, name: str) -> PyverbsDevice:
        try:
            return PyverbsDevice(self.pv, name, self.gid_index)
        except self.pv.Error as exc:
            raise NoRdmaDeviceError(
                f"cannot open RDMA device {name}: {explain_no_devices()} [{exc}]", device=name
            ) from None


class PyverbsDevice(VerbsDevice):
    def __init__(self, pv: Any, name: str, gid_index: int | None) -> None:
        self.pv = pv
        self.name = name
        self._gid_index = gid_index
        self.ctx = pv.device.Context(name=name)
        self.pd = pv.pd.PD(self.ctx)
        self._mrs: dict[int, Any] = {}
        self.scratch = pv.mr.MR(self.pd, 64, int(Access.LOCAL_WRITE))  # receive SGEs point here
        self._num_ports = int(self.ctx.query_device().phys_port_cnt)

    @property
    def num_ports(self) -> int:
        return self._num_ports

    def _choose_gid(self, port_num: int, attr: Any) -> tuple[int, str]:
        """RoCE: the first non-zero RoCE v2 GID, IPv4-mapped preferred. IB: GID 0."""
        e = self.pv.e
        if attr.link_layer != e.IBV_LINK_LAYER_ETHERNET:
            return 0, str(self.ctx.query_gid(port_num, 0))
        if self._gid_index is not None:
            return self._gid_index, str(self.ctx.query_gid(port_num, self._gid_index))
        best: tuple[int, int, str] | None = None
        for index in range(min(attr.gid_tbl_len, 32)):
            try:
                gid = str(self.ctx.query_gid(port_num, index))
                v2 = (
                    self.ctx.query_gid_type(port_num, index)
                    == e.ibv_gid_type_sysfs.IBV_GID_TYPE_SYSFS_ROCE_V2
                )
            except self.pv.Error:
                continue
            if gid == ZERO_GID:
                continue
            score = (2 if v2 else 0) + (1 if ":ffff:" in gid else 0)
            if best is None or score > best[0]:
                best = (score, index, gid)
        if best is None:
            raise NoRdmaDeviceError(
                f"port {port_num} has no usable GID (no IP on its netdev?)", device=self.name
            )
        return best[1], best[2]

    def query_port(self, port_num: int) -> PortInfo:
        e = self.pv.e
        attr = self.ctx.query_port(port_num)
        gid_index, gid = self._choose_gid(port_num, attr)
        rate = _SPEED_GBPS.get(attr.active_speed, 0.0) * _WIDTH_LANES.get(attr.active_width, 0) or None
        return PortInfo(
            port_num=port_num,
            is_active=attr.state == e.ibv_port_state.IBV_PORT_ACTIVE,
            link_layer=LinkLayer.ETHERNET
            if attr.link_layer == e.IBV_LINK_LAYER_ETHERNET
            else LinkLayer.INFINIBAND,
            active_mtu_bytes=mtu_from_enum(attr.active_mtu),
            lid=attr.lid,
            gid=gid,
            gid_index=gid_index,
            max_msg_bytes=attr.max_msg_sz,
            rate_gbps=rate,
        )

    def _mr_error(self, message: str, errno_code: int | None) -> VerbsCallError:
        return VerbsCallError(message, errno_code=errno_code, device=self.name)

    def register_memory(self, addr: int, length: int, access: Access) -> MemoryRegion:
        try:
            mr = self.pv.mr.MR(self.pd, length, int(access), address=addr)
        except self.pv.Error as exc:
            message = f"ibv_reg_mr of {length} bytes at {addr:#x} failed: {exc}"
            raise self._mr_error(message, errno_of(exc)) from None
        self._mrs[mr.lkey] = mr
        return MemoryRegion(mr.buf, length, mr.lkey, mr.rkey, access)

    def register_dmabuf(
        self, fd: int, offset: int, length: int, access: Access, *, iova: int | None = None
    ) -> MemoryRegion:
        unsupported = errno.EOPNOTSUPP
        if iova is not None and iova != offset:
            message = (
                f"pyverbs' DmaBufMR registers at iova = offset ({offset:#x}), not {iova:#x}; "
                "a VA-addressed dma-buf MR needs ibv_reg_mr_ex (rdma-core 60+)"
            )
            raise self._mr_error(message, unsupported)
        dmabuf_mr = getattr(self.pv.mr, "DmaBufMR", None)
        if dmabuf_mr is None:
            raise self._mr_error("this pyverbs has no DmaBufMR (rdma-core < 34)", unsupported)
        try:
            mr = dmabuf_mr(self.pd, length, int(access), dmabuf=fd, offset=offset)
        except TypeError:  # builds whose DmaBufMR takes only pyverbs' own (DRM) DmaBuf objects
            raise self._mr_error("this pyverbs' DmaBufMR does not accept a dma-buf fd", unsupported) from None
        except self.pv.Error as exc:
            message = f"ibv_reg_dmabuf_mr of {length} bytes at offset {offset:#x} of fd {fd} failed: {exc}"
            raise self._mr_error(message, errno_of(exc)) from None
        self._mrs[mr.lkey] = mr
        return MemoryRegion(offset, length, mr.lkey, mr.rkey, access)  # mr.buf is 0: the IOVA is the offset

    def deregister_memory(self, mr: MemoryRegion) -> None:
        handle = self._mrs.pop(mr.lkey, None)
        if handle is not None:
            handle.close()

    def create_qp(self, port_num: int, caps: QPCaps) -> PyverbsQueuePair:
        return PyverbsQueuePair(self, port_num, caps)

    def close(self) -> None:
        for handle in self._mrs.values():
            handle.close()
        self._mrs.clear()
        self.scratch.close()
        self.pd.close()
        self.ctx.close()


Fields = tuple[dict[str, Any], tuple[str, ...]]


def init_fields(attrs: InitAttrs) -> Fields:
    fields = {
        "pkey_index": attrs.pkey_index,
        "port_num": attrs.port_num,
        "qp_access_flags": int(attrs.access),
    }
    return fields, ("IBV_QP_PKEY_INDEX", "IBV_QP_PORT", "IBV_QP_ACCESS_FLAGS")


def rtr_fields(pv: Any, attrs: RtrAttrs) -> Fields:
    gr = None
    if attrs.is_global:
        gr = pv.addr.GlobalRoute(
            dgid=pv.addr.GID(attrs.dgid),
            sgid_index=attrs.sgid_index,
            hop_limit=attrs.hop_limit,
            traffic_class=attrs.traffic_class,
        )
    ah = pv.addr.AHAttr(
        gr=gr,
        is_global=int(attrs.is_global),
        dlid=attrs.dlid,
        sl=attrs.service_level,
        port_num=attrs.port_num,
    )
    fields = {
        "path_mtu": mtu_to_enum(attrs.path_mtu_bytes),
        "dest_qp_num": attrs.dest_qpn,
        "rq_psn": attrs.rq_psn,
        "max_dest_rd_atomic": attrs.max_dest_rd_atomic,
        "min_rnr_timer": attrs.min_rnr_timer,
        "ah_attr": ah,
    }
    return fields, (
        "IBV_QP_AV",
        "IBV_QP_PATH_MTU",
        "IBV_QP_DEST_QPN",
        "IBV_QP_RQ_PSN",
        "IBV_QP_MAX_DEST_RD_ATOMIC",
        "IBV_QP_MIN_RNR_TIMER",
    )


def rts_fields(attrs: RtsAttrs) -> Fields:
    fields = {
        "sq_psn": attrs.sq_psn,
        "timeout": attrs.timeout,
        "retry_cnt": attrs.retry_cnt,
        "rnr_retry": attrs.rnr_retry,
        "max_rd_atomic": attrs.max_rd_atomic,
    }
    return fields, (
        "IBV_QP_SQ_PSN",
        "IBV_QP_TIMEOUT",
        "IBV_QP_RETRY_CNT",
        "IBV_QP_RNR_RETRY",
        "IBV_QP_MAX_QP_RD_ATOMIC",
    )


class PyverbsQueuePair(QueuePair):
    def __init__(self, device: PyverbsDevice, port_num: int, caps: QPCaps) -> None:
        pv, e = device.pv, device.pv.e
        self.device, self.pv, self.caps = device, pv, caps
        try:
            self.send_cq = pv.cq.CQ(device.ctx, caps.max_send_wr)
            self.recv_cq = pv.cq.CQ(device.ctx, caps.max_recv_wr)
            cap = pv.qp.QPCap(
                max_send_wr=caps.max_send_wr, max_recv_wr=caps.max_recv_wr, max_send_sge=1, max_recv_sge=1
            )
            init = pv.qp.QPInitAttr(
                qp_type=e.ibv_qp_type.IBV_QPT_RC, scq=self.send_cq, rcq=self.recv_cq, cap=cap, sq_sig_all=0
            )
            self.qp = pv.qp.QP(device.pd, init)
        except pv.Error as exc:
            raise VerbsCallError(f"creating an RC QP failed: {exc}", device=device.name) from None
        self.qpn = self.qp.qp_num
        self.state = QPState.RESET
        self._slots = SendQueueSlots(caps.max_send_wr)
        self._num_posted_recvs = 0

    def _modify(self, target: QPState, fields: dict[str, Any], mask_names: Sequence[str]) -> None:
        check_transition(self.state, target, self.qpn)
        attr, mask = build_qp_attr(self.pv, target, fields, mask_names)
        try:
            self.qp.modify(attr, mask)
        except self.pv.Error as exc:
            raise VerbsCallError(
                f"QP {self.qpn} -> {target.name} failed: {exc}", device=self.device.name
            ) from None
        self.state = target

    def to_init(self, attrs: InitAttrs) -> None:
        self._modify(QPState.INIT, *init_fields(attrs))

    def to_rtr(self, attrs: RtrAttrs) -> None:
        self._modify(QPState.RTR, *rtr_fields(self.pv, attrs))

    def to_rts(self, attrs: RtsAttrs) -> None:
        self._modify(QPState.RTS, *rts_fields(attrs))

    def to_error(self) -> None:
        self._modify(QPState.ERROR, {}, ())

    def to_reset(self) -> None:
        self._modify(QPState.RESET, {}, ())
        self._slots.clear()
        self._num_posted_recvs = 0

    def post_send(self, wrs: Sequence[WorkRequest]) -> None:
        if self.state not in (QPState.RTS, QPState.ERROR):
            raise QueuePairStateError(
                f"QP {self.qpn}: post_send in {self.state.name}", device=self.device.name
            )
        if not wrs:
            return
        e, wr_mod = self.pv.e, self.pv.wr
        self._slots.reserve(wrs, self.qpn)
        keep: list[Any] = []  # pyverbs chains by raw pointer: every SGE/SendWR must outlive post_send
        head = None
        for wr in reversed(wrs):
            sge = wr_mod.SGE(wr.local_addr, wr.length, wr.lkey)
            opcode = (
                e.ibv_wr_opcode.IBV_WR_RDMA_WRITE
                if wr.imm_data is None
                else e.ibv_wr_opcode.IBV_WR_RDMA_WRITE_WITH_IMM
            )
            flags = int(e.ibv_send_flags.IBV_SEND_SIGNALED) if wr.signaled else 0
            send = wr_mod.SendWR(
                wr_id=wr.wr_id,
                opcode=opcode,
                num_sge=1,
                sg=[sge],
                send_flags=flags,
                imm_data=socket.htonl(wr.imm_data or 0),
                next_wr=head,
            )
            send.set_wr_rdma(wr.rkey, wr.remote_addr)
            keep += [sge, send]
            head = send
        self._post("ibv_post_send", self.qp.post_send, head, keep)

    def _post(self, call: str, post: Callable[[Any], None], wr: Any, owned: Sequence[Any]) -> None:
        """``post(wr)``, then close each of ``owned`` exactly once, whatever happened: pyverbs does
        not keep chained WRs alive, and SGE/SendWR/RecvWR leak unless closed."""
        try:
            post(wr)
        except self.pv.Error as exc:
            raise VerbsCallError(f"QP {self.qpn}: {call} failed: {exc}", device=self.device.name) from None
        finally:
            for obj in owned:
                obj.close()

    def post_recv(self, wr_ids: Sequence[int]) -> None:
        if self.state not in (QPState.INIT, QPState.RTR, QPState.RTS, QPState.ERROR):
            raise QueuePairStateError(
                f"QP {self.qpn}: post_recv in {self.state.name}", device=self.device.name
            )
        if self._num_posted_recvs + len(wr_ids) > self.caps.max_recv_wr:
            raise VerbsCallError(f"QP {self.qpn}: receive queue full", device=self.device.name)
        scratch = self.device.scratch
        for wr_id in wr_ids:
            sge = self.pv.wr.SGE(scratch.buf, 1, scratch.lkey)
            recv = self.pv.wr.RecvWR(wr_id=wr_id, num_sge=1, sg=[sge])
            self._post("ibv_post_recv", self.qp.post_recv, recv, (sge, recv))
            self._num_posted_recvs += 1

    def _completions(self, cq: Any, max_entries: int) -> list[Completion]:
        e = self.pv.e
        _, wcs = cq.poll(max_entries)
        out: list[Completion] = []
        for wc in wcs:
            status = WcStatus.of(wc.status)
            if status is not WcStatus.SUCCESS:
                self.state = QPState.ERROR
            try:
                opcode: WcOpcode | None = WcOpcode(wc.opcode) if status is WcStatus.SUCCESS else None
            except ValueError:
                opcode = None
            imm = socket.ntohl(wc.imm_data) if wc.wc_flags & int(e.ibv_wc_flags.IBV_WC_WITH_IMM) else None
            out.append(Completion(wc.wr_id, status, opcode, self.qpn, imm))
        return out

    def poll_send(self, max_entries: int) -> list[Completion]:
        out = self._completions(self.send_cq, max_entries)
        for completion in out:
            self._slots.retire(completion)
        return out

    def poll_recv(self, max_entries: int) -> list[Completion]:
        out = self._completions(self.recv_cq, max_entries)
        self._num_posted_recvs -= len(out)
        return out

    def destroy(self) -> None:
        self.qp.close()
        self.send_cq.close()
        self.recv_cq.close()
