"""RDMA WRITE bandwidth and per-request latency between two local QPs, for block runs of 4 KiB to 4 MiB.

    python bench/rdma_bandwidth.py [--device mlx5_0] [--iters 2000] [--min-kib 4] [--max-kib 4096]

Both QPs live on one device (loopback through the NIC), built with the same connection code, QP
policy and batching the transport uses (rdma.connection, rdma.plan), so the numbers are what one
transport lane can reach from Python. Reports, per size: GB/s with a full pipeline (batches of
half the send queue, one signaled WR per batch) and the latency of one signaled WRITE (post ->
completion polled; median and p99), against the port's line rate.

With no RDMA device it exits with status 1 and the reason. ``--fake`` runs the same code on the
test double (numbers are memcpy speed, meaningless for RDMA): a smoke test of the script itself.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from collections.abc import Sequence

from rdma.connection import RcConnection
from rdma.errors import CompletionError, NoRdmaDeviceError, PyverbsUnavailableError
from rdma.plan import WriteOp, batches, to_work_requests
from rdma.verbs import Access, QPCaps, VerbsBackend, VerbsDevice

SEND_QUEUE_DEPTH = 256


def open_backend(args: argparse.Namespace) -> tuple[VerbsBackend, str]:
    if args.fake:
        from rdma.fake import FakeBackend, FakeFabric, FakePort

        return FakeBackend(FakeFabric().add_device("fake0", FakePort(active_mtu_bytes=4096))), "fake0"
    from rdma.pyverbs_backend import PyverbsBackend

    backend = PyverbsBackend()
    names = backend.list_devices()
    if not names:
        raise NoRdmaDeviceError("no RDMA device with an active port")
    if args.device and args.device not in names:
        raise NoRdmaDeviceError(f"{args.device} has no active port; active: {names}")
    return backend, args.device or names[0]


class Completions:
    """Cumulative count of polled send completions. A poll may return completions of chains posted
    after the one being waited for, so waits compare totals instead of counting per call."""

    def __init__(self, conn: RcConnection) -> None:
        self.conn = conn
        self.seen = 0

    def wait_total(self, total: int) -> None:
        deadline = time.monotonic() + 30
        while self.seen < total:
            for completion in self.conn.qp.poll_send(64):
                if not completion.ok:
                    raise CompletionError(
                        f"WRITE failed: {completion.status.name}",
                        status=completion.status.name,
                        wr_id=completion.wr_id,
                        qpn=completion.qpn,
                    )
                self.seen += 1
            if time.monotonic() > deadline:
                raise TimeoutError("no completion within 30 s")


def measure(device: VerbsDevice, sizes: Sequence[int], iters: int, latency_iters: int) -> None:
    port = device.query_port(1)
    caps = QPCaps(max_send_wr=SEND_QUEUE_DEPTH, max_recv_wr=1)
    a, b = RcConnection(device, port, caps=caps), RcConnection(device, port, caps=caps)
    a_end, b_end = a.local_endpoint(), b.local_endpoint()
    a.connect(b_end)
    b.connect(a_end)
    span = max(sizes) * 16  # cycle over 16 slots so consecutive WRITEs do not hit one cache line set
    src, dst = ctypes.create_string_buffer(span), ctypes.create_string_buffer(span)
    smr = device.register_memory(ctypes.addressof(src), span, Access.LOCAL_WRITE)
    dmr = device.register_memory(ctypes.addressof(dst), span, Access.LOCAL_WRITE | Access.REMOTE_WRITE)
    rate = f"{port.rate_gbps:g} Gb/s = {port.rate_gbps / 8:.2f} GB/s" if port.rate_gbps else "unknown"
    print(
        f"device {device.name} port 1: {port.link_layer.value}, MTU {port.active_mtu_bytes}, line rate {rate}"
    )
    print(f"{'size':>9} {'GB/s':>8} {'% line':>7} {'lat p50 us':>11} {'lat p99 us':>11}")
    for size in sizes:
        ops = [WriteOp((i % 16) * size, (i % 16) * size, size) for i in range(iters)]
        wrs = to_work_requests(
            ops, local_base=smr.addr, lkey=smr.lkey, remote_base=dmr.addr, rkey=dmr.rkey, first_wr_id=1
        )
        chains = batches(wrs, max_batch=SEND_QUEUE_DEPTH // 2)
        done = Completions(a)  # one signaled WR per chain
        start = time.perf_counter()
        for posted, chain in enumerate(chains):
            if posted >= 2:  # two chains fill the queue: wait for the oldest
                done.wait_total(posted - 1)
            a.qp.post_send(chain)
        done.wait_total(len(chains))
        gbps = size * iters / (time.perf_counter() - start) / 1e9
        latencies = []
        for i in range(latency_iters):
            single = to_work_requests(
                [ops[i % 16]],
                local_base=smr.addr,
                lkey=smr.lkey,
                remote_base=dmr.addr,
                rkey=dmr.rkey,
                first_wr_id=10**6 + i,
            )
            wr = batches(single, max_batch=1)[0][0]  # signaled
            t0 = time.perf_counter()
            a.qp.post_send([wr])
            done.wait_total(len(chains) + i + 1)
            latencies.append((time.perf_counter() - t0) * 1e6)
        share = f"{100 * gbps * 8 / port.rate_gbps:6.1f}%" if port.rate_gbps else "      -"
        p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 2 else latencies[0]
        print(f"{size // 1024:>6}KiB {gbps:8.2f} {share} {statistics.median(latencies):11.1f} {p99:11.1f}")
    a.close()
    b.close()
    device.deregister_memory(smr)
    device.deregister_memory(dmr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="RDMA device (default: the first with an active port)")
    parser.add_argument("--iters", type=int, default=2000, help="WRITEs per size for bandwidth")
    parser.add_argument("--latency-iters", type=int, default=200, help="single WRITEs per size for latency")
    parser.add_argument("--min-kib", type=int, default=4)
    parser.add_argument("--max-kib", type=int, default=4096)
    parser.add_argument(
        "--fake", action="store_true", help="run on the test double (smoke test; not RDMA numbers)"
    )
    args = parser.parse_args(argv)
    if args.iters < 1 or args.latency_iters < 1 or not 0 < args.min_kib <= args.max_kib:
        parser.error("--iters/--latency-iters must be >= 1 and 0 < --min-kib <= --max-kib")
    sizes = []
    kib = args.min_kib
    while kib <= args.max_kib:
        sizes.append(kib * 1024)
        kib *= 4
    try:
        backend, name = open_backend(args)
        device = backend.open_device(name)
    except (PyverbsUnavailableError, NoRdmaDeviceError) as exc:
        print(f"rdma_bandwidth: cannot run: {exc}", file=sys.stderr)
        return 1
    try:
        if args.fake:
            print("NOTE: --fake measures the test double (memcpy), not RDMA")
        measure(device, sizes, args.iters, args.latency_iters)
    finally:
        device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
