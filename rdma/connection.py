"""One RC connection: the QP attribute policy and the RESET -> INIT -> RTR -> RTS state machine.

    RESET --to_init(port, access)--> INIT --to_rtr(peer: qpn, psn, gid|lid, mtu)--> RTR
          --to_rts(our psn, timeout, retries)--> RTS --(any completion error)--> ERROR
    ERROR --recreate()--> RESET (a fresh QP: new qpn and psn, so a new handshake is needed)

Why these attributes (pyverbs' defaults are wrong for RC, see docs/rdma.md):

    attribute           value   why
    path_mtu            min(local active_mtu, peer active_mtu): a bigger MTU is dropped on the path
    timeout             14      4.096 us * 2^14 = 67 ms per transport retry (0 = wait forever)
    retry_cnt           7       transport retries before RETRY_EXC_ERR
    rnr_retry           6       7 would mean "retry forever" on a missing receive: a hang, not an error
    min_rnr_timer       12      0.64 ms between RNR retries
    max_rd_atomic       1       >= 1 (0 forbids RDMA READ, which a GPU flush may need)
    hop_limit           64      GlobalRoute's default 1 is dropped by the first router on RoCE v2
    is_global / dgid    RoCE    Ethernet has no LIDs: the GRH (GID) is the address
    dlid                IB      InfiniBand routes by LID inside a subnet
    access              LOCAL_WRITE | REMOTE_WRITE on the QP (the responder checks it too)
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from rdma.errors import InvalidConnectionInfoError, QueuePairStateError
from rdma.messages import QpEndpoint
from rdma.verbs import (
    Access,
    InitAttrs,
    LinkLayer,
    PortInfo,
    QPCaps,
    QPState,
    QueuePair,
    RtrAttrs,
    RtsAttrs,
    VerbsDevice,
)

PSN_BITS = 24
QP_ACCESS = Access.LOCAL_WRITE | Access.REMOTE_WRITE


@dataclass(frozen=True)
class QPPolicy:
    timeout: int = 14
    retry_cnt: int = 7
    rnr_retry: int = 6
    min_rnr_timer: int = 12
    max_rd_atomic: int = 1
    hop_limit: int = 64
    traffic_class: int = 0  # GRH traffic class (DSCP << 2 on RoCE v2): --rdma-traffic-class
    service_level: int = 0  # ah_attr.sl: --rdma-service-level

    def __post_init__(self) -> None:
        checks = (
            ("timeout", self.timeout, 1, 31),
            ("retry_cnt", self.retry_cnt, 0, 7),
            ("rnr_retry", self.rnr_retry, 0, 7),
            ("min_rnr_timer", self.min_rnr_timer, 0, 31),
            ("max_rd_atomic", self.max_rd_atomic, 1, 16),
            ("hop_limit", self.hop_limit, 2, 255),
            ("traffic_class", self.traffic_class, 0, 255),
            ("service_level", self.service_level, 0, 15),
        )
        for name, value, low, high in checks:
            if not low <= value <= high:
                raise ValueError(f"rdma {name}: {value} is not in [{low}, {high}]")


def path_mtu_bytes(local: PortInfo, peer: QpEndpoint) -> int:
    return min(local.active_mtu_bytes, peer.mtu_bytes)


def init_attrs(port: PortInfo) -> InitAttrs:
    return InitAttrs(port_num=port.port_num, access=QP_ACCESS)


def rtr_attrs(local: PortInfo, peer: QpEndpoint, policy: QPPolicy) -> RtrAttrs:
    if peer.link_layer is not local.link_layer:
        raise InvalidConnectionInfoError(
            f"link layers differ: local {local.link_layer.value}, peer {peer.link_layer.value}",
            peer=peer.device,
        )
    roce = local.link_layer is LinkLayer.ETHERNET
    return RtrAttrs(
        path_mtu_bytes=path_mtu_bytes(local, peer),
        dest_qpn=peer.qpn,
        rq_psn=peer.psn,  # the peer sends starting at its psn: we expect exactly that
        max_dest_rd_atomic=policy.max_rd_atomic,
        min_rnr_timer=policy.min_rnr_timer,
        is_global=roce,
        dgid=peer.gid if roce else None,
        sgid_index=local.gid_index,
        hop_limit=policy.hop_limit,
        traffic_class=policy.traffic_class,
        dlid=0 if roce else peer.lid,
        port_num=local.port_num,
        service_level=policy.service_level,
    )


def rts_attrs(local_psn: int, policy: QPPolicy) -> RtsAttrs:
    return RtsAttrs(
        sq_psn=local_psn,
        timeout=policy.timeout,
        retry_cnt=policy.retry_cnt,
        rnr_retry=policy.rnr_retry,
        max_rd_atomic=policy.max_rd_atomic,
    )


def random_psn() -> int:
    return random.getrandbits(PSN_BITS)


class RcConnection:
    """One RC QP on one device port and its life cycle. Not thread-safe: one owner drives it."""

    def __init__(
        self,
        device: VerbsDevice,
        port: PortInfo,
        *,
        caps: QPCaps | None = None,
        policy: QPPolicy | None = None,
        psn_source: Callable[[], int] = random_psn,
    ) -> None:
        self.device = device
        self.port = port
        self.caps = caps or QPCaps()
        self.policy = policy or QPPolicy()
        self._psn_source = psn_source
        self.qp: QueuePair = device.create_qp(port.port_num, self.caps)
        self.psn = psn_source() % (1 << PSN_BITS)
        self.peer: QpEndpoint | None = None
        self.qp.to_init(init_attrs(port))

    @property
    def state(self) -> QPState:
        return self.qp.state

    @property
    def is_ready(self) -> bool:
        return self.qp.state is QPState.RTS

    def local_endpoint(self) -> QpEndpoint:
        return QpEndpoint(
            device=self.device.name,
            port_num=self.port.port_num,
            link_layer=self.port.link_layer,
            lid=self.port.lid,
            gid=self.port.gid,
            qpn=self.qp.qpn,
            psn=self.psn,
            mtu_bytes=self.port.active_mtu_bytes,
        )

    def connect(self, peer: QpEndpoint) -> None:
        """INIT -> RTR -> RTS towards ``peer``, which was given ``local_endpoint()`` of THIS QP.
        A used QP must be ``recreate()``d (and the new endpoint exchanged) first."""
        if self.qp.state is not QPState.INIT:
            raise QueuePairStateError(
                f"QP {self.qp.qpn} is {self.qp.state.name}: recreate() and exchange endpoints again",
                device=self.device.name,
            )
        self.qp.to_rtr(rtr_attrs(self.port, peer, self.policy))
        self.qp.to_rts(rts_attrs(self.psn, self.policy))
        self.peer = peer

    def recreate(self) -> None:
        """Replace the QP (after ERROR, or to re-handshake): new qpn and psn, back in INIT."""
        self.qp.destroy()
        self.qp = self.device.create_qp(self.port.port_num, self.caps)
        self.psn = self._psn_source() % (1 << PSN_BITS)
        self.peer = None
        self.qp.to_init(init_attrs(self.port))

    def close(self) -> None:
        self.qp.destroy()
