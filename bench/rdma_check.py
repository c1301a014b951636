"""End-to-end check of the rdma KV transport on a machine with RDMA NICs (or Soft-RoCE).

    python bench/rdma_check.py                 # the NICs rdma.nics picks, CPU KV caches
    python bench/rdma_check.py --device rxe0   # one named device (Soft-RoCE: rdma link add rxe0 ...)
    python bench/rdma_check.py --gpu           # also CUDA KV caches with real ready events
    python bench/rdma_check.py --fake          # the same steps on the verbs test double (smoke test)

Steps, each printed PASS/FAIL with its reason (exit status 1 if any failed):
  1. devices   the NICs chosen (KVCACHE_RDMA_NICS or detection), their active port, link, GID, rate
  2. auth      a wrong cluster token is refused; the target keeps serving
  3. transfer  P and D transports on this machine (loopback through the NIC): every layer of many
               requests lands byte-exact; transport bandwidth against the port's line rate
  4. cancel    P's forget returns with WRITEs in flight, D releases: no byte lands afterwards
  5. revoke    D moves P's QPs to ERROR: P's later WRITEs fail, nothing lands
  6. gpu       (--gpu) CUDA KV on both sides; each layer is written on a CUDA stream behind a
               spin kernel and shipped with its event: the bytes that land are the new ones
Compare the bandwidth with `ib_write_bw -d <dev> --report_gbits` between the same ports.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import torch

from rdma.fake import FakeBackend, FakeFabric
from rdma.initiator import RdmaInitiator
from rdma.resources import OPTION_GID_INDEX, choose_nics, first_active_port
from rdma.target import RdmaTarget
from rdma.verbs import VerbsBackend
from splitwise.engine.kv_cache import KVCache, KVCacheGeometry
from splitwise.engine.layer_ready import ReadyToken, record_layer_ready
from splitwise.transfer.base import TransportOptions
from splitwise.transfer.errors import TransferError

TOKEN = "rdma-check-token"
Results = list[tuple[str, bool, str]]


def geometry(args: argparse.Namespace) -> KVCacheGeometry:
    return KVCacheGeometry(
        num_layers=args.layers,
        num_blocks=args.blocks,
        block_size=16,
        num_kv_heads=8,
        head_dim=128,
        dtype="float16",
    )


def backend_and_nics(args: argparse.Namespace, kv: KVCache) -> tuple[VerbsBackend, list[str]]:
    if args.fake:
        fabric = FakeFabric(dma_delay_s=0.0)
        fabric.add_device("fake0")
        return FakeBackend(fabric), ["fake0"]
    from rdma.pyverbs_backend import PyverbsBackend

    gid = args.gid_index
    backend = PyverbsBackend(gid_index=gid)
    names = [args.device] if args.device else choose_nics(kv, TransportOptions())
    return backend, names


def options(args: argparse.Namespace, node_id: str, token: str = TOKEN) -> TransportOptions:
    extra = {} if args.gid_index is None else {OPTION_GID_INDEX: str(args.gid_index)}
    return TransportOptions(connect_timeout_s=10, node_id=node_id, cluster_token=token, extra=extra)


def pair(
    args: argparse.Namespace, backend: VerbsBackend, names: list[str], p_kv: KVCache, d_kv: KVCache
) -> tuple[RdmaInitiator, RdmaTarget]:
    target = RdmaTarget(options(args, "check-d"), backend=backend, nics=names)
    initiator = RdmaInitiator(options(args, "check-p"), backend=backend, nics=names, completion_timeout_s=30)
    target.register(d_kv)
    initiator.register(p_kv)
    initiator.connect("d", target.endpoint())
    return initiator, target


def step_devices(backend: VerbsBackend, names: list[str]) -> str:
    lines = []
    for name in names:
        device = backend.open_device(name)
        try:
            port = first_active_port(device)
            rate = f"{port.rate_gbps:g} Gb/s" if port.rate_gbps else "rate unknown"
            lines.append(
                f"{name} port {port.port_num} {port.link_layer.value} MTU {port.active_mtu_bytes} "
                f"gid[{port.gid_index}]={port.gid} {rate}"
            )
        finally:
            device.close()
    return "; ".join(lines)


def step_auth(args: argparse.Namespace, backend: VerbsBackend, names: list[str], kv: KVCache) -> str:
    target = RdmaTarget(options(args, "check-d"), backend=backend, nics=names)
    intruder = RdmaInitiator(options(args, "intruder", token="wrong"), backend=backend, nics=names)
    try:
        target.register(kv)
        intruder.register(KVCache(kv.geometry))
        try:
            intruder.connect("d", target.endpoint())
        except TransferError as exc:
            return f"wrong token refused ({type(exc).__name__}); refusals={target.counters.get('handshakes_refused')}"
        raise AssertionError("a wrong cluster token was accepted")
    finally:
        intruder.close()
        target.close()


def ship(initiator: RdmaInitiator, req_id: str, src: list[int], dst: list[int], layers: int) -> None:
    for layer in range(layers):
        initiator.write_layer("d", req_id, layer, src, dst)
    initiator.finish("d", req_id)


def step_transfer(
    args: argparse.Namespace,
    initiator: RdmaInitiator,
    target: RdmaTarget,
    p_kv: KVCache,
    d_kv: KVCache,
    rate: float,
) -> str:
    g = p_kv.geometry
    per_request = args.blocks // 2
    src, dst = list(range(per_request)), list(range(per_request, 2 * per_request))
    moved = 0
    started = time.perf_counter()
    for index in range(args.requests):
        req_id = f"bw{index}"
        target.expect(req_id, dst, timeout_s=60)
        ship(initiator, req_id, src, dst, g.num_layers)
        status = initiator.wait(req_id, 60)
        if not status.is_done:
            raise AssertionError(f"{req_id}: {status}")
        initiator.forget(req_id)
        target.forget(req_id)
        moved += 2 * g.num_layers * per_request * g.bytes_per_block
    elapsed = time.perf_counter() - started
    if not torch.equal(d_kv.tensor[:, :, dst].view(torch.int16), p_kv.tensor[:, :, src].view(torch.int16)):
        raise AssertionError("bytes differ after the transfer")
    gbps = moved * 8 / elapsed / 1e9
    line = f" = {100 * gbps / rate:.0f}% of the {rate:g} Gb/s line rate" if rate else ""
    return f"{args.requests} requests x {moved // args.requests / 2**20:.1f} MiB byte-exact; {gbps:.2f} Gb/s{line}"


def sentinel_kept(d_kv: KVCache, dst: list[int], value: int) -> bool:
    return bool((d_kv.tensor[:, :, dst].view(torch.int16) == value).all())


def release(d_kv: KVCache, dst: list[int], value: int) -> None:
    d_kv.tensor[:, :, dst] = torch.tensor(value, dtype=torch.int16).view(torch.float16)


def step_cancel(initiator: RdmaInitiator, target: RdmaTarget, d_kv: KVCache, layers: int) -> str:
    src, dst = [0, 1, 2, 3], [8, 9, 10, 11]
    for index in range(20):
        req_id = f"cancel{index}"
        target.expect(req_id, dst, timeout_s=30)
        ship(initiator, req_id, src, dst, layers)
        target.forget(req_id)
        initiator.forget(req_id)  # the acknowledgement: nothing more can land
        release(d_kv, dst, 0x2A2A)
        time.sleep(0.01)
        if not sentinel_kept(d_kv, dst, 0x2A2A):
            raise AssertionError(f"{req_id}: bytes landed after P's forget returned")
    return "20 cancels mid-transfer, no byte after the acknowledgement"


def step_revoke(initiator: RdmaInitiator, target: RdmaTarget, d_kv: KVCache, layers: int) -> str:
    src, dst = [0, 1], [12, 13]
    target.expect("rv", dst, timeout_s=30)
    if not target.revoke("check-p"):
        raise AssertionError("revoke not confirmed")
    release(d_kv, dst, 0x1313)
    try:
        ship(initiator, "rv", src, dst, layers)
    except TransferError:
        pass  # refused outright: fine
    status = initiator.wait("rv", 30)
    time.sleep(0.05)
    if status.is_done or not sentinel_kept(d_kv, dst, 0x1313):
        raise AssertionError(f"a revoked initiator still wrote ({status})")
    return f"after revoke: P's request {status.state.value} ({status.reason}), D's blocks untouched"


def step_gpu(args: argparse.Namespace, backend: VerbsBackend, names: list[str]) -> str:
    if not torch.cuda.is_available():
        raise AssertionError("no CUDA device")
    g = geometry(args)
    p_kv, d_kv = KVCache(g, device="cuda"), KVCache(g, device="cuda")
    initiator, target = pair(args, backend, names, p_kv, d_kv)
    compute = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    src, dst = list(range(8)), list(range(8, 16))
    try:
        target.expect("gpu", dst, timeout_s=60)
        tokens: list[ReadyToken] = []
        with torch.cuda.stream(compute):
            for layer in range(g.num_layers):
                torch.cuda._sleep(50_000_000)  # type: ignore[attr-defined]  # the layer is 'slow'
                p_kv.tensor[layer, :, src] = float(layer + 1)
                tokens.append(record_layer_ready(p_kv.device))
        for layer, token in enumerate(tokens):
            initiator.write_layer("d", "gpu", layer, src, dst, token)
        initiator.finish("d", "gpu")
        status = initiator.wait("gpu", 60)
        if not status.is_done:
            raise AssertionError(f"GPU transfer {status}")
        for layer in range(g.num_layers):
            if not bool((d_kv.tensor[layer, :, dst] == float(layer + 1)).all()):
                raise AssertionError(f"layer {layer}: stale bytes landed (the event was not waited for)")
        return f"{g.num_layers} layers written behind spin kernels landed new, not stale ({', '.join(names)})"
    finally:
        initiator.close()
        target.close()


def run(name: str, results: Results, action: Callable[[], str]) -> None:
    try:
        detail = action()
        results.append((name, True, detail))
    except Exception as exc:  # noqa: BLE001 - a check reports every failure and goes on
        results.append((name, False, f"{type(exc).__name__}: {exc}"))
    ok, detail = results[-1][1], results[-1][2]
    print(f"{'PASS' if ok else 'FAIL'}  {name:9} {detail}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="one RDMA device (default: KVCACHE_RDMA_NICS or detection)")
    parser.add_argument("--gid-index", type=int, default=None, help="RoCE source GID index")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument(
        "--blocks", type=int, default=256, help="KV blocks per side (16 tokens x 8 heads x 128)"
    )
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--gpu", action="store_true", help="also check CUDA KV caches")
    parser.add_argument("--fake", action="store_true", help="the verbs test double (smoke test, not RDMA)")
    args = parser.parse_args(argv)
    if args.fake:
        print("NOTE: --fake runs the test double (memcpy), not RDMA; the numbers mean nothing")
    g = geometry(args)
    p_kv, d_kv = KVCache(g), KVCache(g)
    p_kv.as_bytes().copy_(torch.randint(0, 256, (g.total_bytes,), dtype=torch.uint8))
    results: Results = []
    try:
        backend, names = backend_and_nics(args, d_kv)
    except Exception as exc:  # noqa: BLE001 - no device: say why and stop
        print(f"FAIL  devices   {type(exc).__name__}: {exc}")
        return 1
    run("devices", results, lambda: step_devices(backend, names))
    if not results[-1][1]:
        return 1
    rate = 0.0
    device = backend.open_device(names[0])
    try:
        rate = (first_active_port(device).rate_gbps or 0.0) * len(names)
    finally:
        device.close()
    run("auth", results, lambda: step_auth(args, backend, names, KVCache(g)))
    initiator, target = pair(args, backend, names, p_kv, d_kv)
    try:
        run("transfer", results, lambda: step_transfer(args, initiator, target, p_kv, d_kv, rate))
        run("cancel", results, lambda: step_cancel(initiator, target, d_kv, g.num_layers))
        run("revoke", results, lambda: step_revoke(initiator, target, d_kv, g.num_layers))
    finally:
        initiator.close()
        target.close()
    if args.gpu:
        run("gpu", results, lambda: step_gpu(args, backend, names))
    failed = [name for name, ok, _ in results if not ok]
    print(
        f"{len(results) - len(failed)}/{len(results)} passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
