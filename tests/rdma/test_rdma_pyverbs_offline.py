"""The pyverbs backend where pyverbs imports but no device exists (this project's CI machines):
the missing device must be a clear NoRdmaDeviceError, not pyverbs' bare 'Failed to get devices list'."""

from __future__ import annotations

import os

import pytest

from rdma.errors import NoRdmaDeviceError, PyverbsUnavailableError


def pyverbs_or_skip() -> None:
    try:
        from rdma.pyverbs_backend import load_pyverbs

        load_pyverbs()
    except PyverbsUnavailableError as exc:
        pytest.skip(f"pyverbs not importable ({exc}); run tools/link_system_pyverbs.sh")


def test_missing_kernel_support_is_explained() -> None:
    pyverbs_or_skip()
    from rdma.pyverbs_backend import PyverbsBackend

    if os.path.isdir("/sys/class/infiniband") and os.listdir("/sys/class/infiniband"):
        pytest.skip("this machine has RDMA devices: the no-device path cannot be observed")
    with pytest.raises(NoRdmaDeviceError) as info:
        names = PyverbsBackend().list_devices()
        if not names:  # a kernel with RDMA support but no device returns [] instead of raising
            raise NoRdmaDeviceError("no RDMA devices")
    assert "RDMA" in str(info.value)


def test_explanations_from_sysfs(tmp_path) -> None:  # noqa: ANN001
    from rdma.pyverbs_backend import explain_no_devices

    assert "no RDMA support" in explain_no_devices(str(tmp_path))
    (tmp_path / "class" / "infiniband").mkdir(parents=True)
    assert "empty" in explain_no_devices(str(tmp_path))
    (tmp_path / "class" / "infiniband" / "mlx5_0").mkdir()
    assert "ib_uverbs" in explain_no_devices(str(tmp_path))


def test_qp_attribute_objects_build_offline() -> None:
    """Our RoCE route values survive pyverbs' own objects (GlobalRoute defaults hop_limit to 1)."""
    pyverbs_or_skip()
    from rdma.pyverbs_backend import load_pyverbs

    pv = load_pyverbs()
    gid = "0000:0000:0000:0000:0000:ffff:0a00:0002"
    gr = pv.addr.GlobalRoute(dgid=pv.addr.GID(gid), sgid_index=3, hop_limit=64, traffic_class=0)
    ah = pv.addr.AHAttr(gr=gr, is_global=1, dlid=0, port_num=1)
    assert (ah.hop_limit, ah.sgid_index, str(ah.dgid), ah.is_global) == (64, 3, gid, 1)


def test_qp_attributes_and_masks_build_offline() -> None:
    """Every transition's pyverbs QPAttr and ibv_modify_qp mask, built from our policy (no device)."""
    pyverbs_or_skip()
    from rdma.connection import QPPolicy, init_attrs, rtr_attrs, rts_attrs
    from rdma.messages import QpEndpoint
    from rdma.pyverbs_backend import build_qp_attr, init_fields, load_pyverbs, rtr_fields, rts_fields
    from rdma.verbs import LinkLayer, PortInfo, QPState

    pv = load_pyverbs()
    port = PortInfo(
        1, True, LinkLayer.ETHERNET, 4096, 0, "0000:0000:0000:0000:0000:ffff:0a00:0001", 3, 1 << 30
    )
    peer = QpEndpoint(
        "mlx5_1", 1, LinkLayer.ETHERNET, 0, "0000:0000:0000:0000:0000:ffff:0a00:0002", 0x99, 0x1234, 1024
    )
    policy = QPPolicy()
    attr, mask = build_qp_attr(pv, QPState.INIT, *init_fields(init_attrs(port)))
    assert (attr.qp_access_flags, attr.port_num, mask) == (3, 1, 1 | 16 | 8 | 32)  # STATE|PKEY|PORT|ACCESS
    attr, mask = build_qp_attr(pv, QPState.RTR, *rtr_fields(pv, rtr_attrs(port, peer, policy)))
    assert (attr.path_mtu, attr.dest_qp_num, attr.rq_psn, attr.min_rnr_timer) == (
        3,
        0x99,
        0x1234,
        12,
    )  # IBV_MTU_1024
    assert (attr.ah_attr.is_global, attr.ah_attr.hop_limit, attr.ah_attr.sgid_index) == (1, 64, 3)
    attr, mask = build_qp_attr(pv, QPState.RTS, *rts_fields(rts_attrs(0x42, policy)))
    assert (attr.sq_psn, attr.timeout, attr.retry_cnt, attr.rnr_retry, attr.max_rd_atomic) == (
        0x42,
        14,
        7,
        6,
        1,
    )
