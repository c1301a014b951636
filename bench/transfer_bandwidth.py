"""KV transfer bandwidth per transport (ipc, tcp over loopback) by block size, next to the machine's
memcpy bandwidth and a raw loopback socket, all measured in the same run.

    .venv/bin/python bench/transfer_bandwidth.py [--total-mib 64] [--repeats 3]

P is this process; D is a spawned child process with its own KV cache (in shared memory for ipc).
One measurement = write_layer for every layer of ``num_blocks`` blocks, finish, and P's ``wait``
until D acknowledged the request (end to end, completion notice included). Two block layouts:
"contig" (src and dst both consecutive: one run per layer, the best case) and "scatter" (dst a
random permutation: one run per block, the worst case for coalescing).

Reference columns, same byte count, measured on the same row (the machine may be shared):
  memcpy  torch ``copy_`` of one contiguous tensor into another (the ceiling for ipc on CPU),
          measured right before EVERY timed transfer (interleaved), reported as min/median of
          all those samples; ``x memcpy`` divides a transport's best by memcpy's best of the row
  socket  a raw loopback TCP stream to another process, sendall of 4 MiB chunks into recv_into
          (the ceiling for tcp)
Transports report best/median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import time
from multiprocessing.connection import Connection

import torch

from splitwise.engine.kv_cache import KVCache, KVCacheGeometry, default_shm_name
from splitwise.transfer import create_initiator, create_target

NUM_LAYERS = 4
NUM_KV_HEADS = 8
HEAD_DIM = 128
DTYPE = "bfloat16"  # 8 heads x 128 x 2 B = 2 KiB per token
BLOCK_TOKENS = [2, 8, 32, 128, 512, 2048]  # 4 KiB .. 4 MiB per block


def geometry_for(block_tokens: int, total_bytes: int) -> KVCacheGeometry:
    bytes_per_block = block_tokens * NUM_KV_HEADS * HEAD_DIM * 2
    num_blocks = max(2, total_bytes // (2 * NUM_LAYERS * bytes_per_block))
    return KVCacheGeometry(
        num_layers=NUM_LAYERS,
        num_blocks=num_blocks,
        block_size=block_tokens,
        num_kv_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        dtype=DTYPE,
    )


def d_process(protocol: str, geometry: KVCacheGeometry, pipe: Connection) -> None:
    kv = KVCache(geometry, shm_name=default_shm_name("splitwise-bench") if protocol == "ipc" else None)
    target = create_target(protocol)
    target.register(kv)
    pipe.send(target.endpoint())
    while True:
        cmd = pipe.recv()
        if cmd[0] == "expect":
            target.expect(cmd[1], cmd[2])
            pipe.send("ok")
        elif cmd[0] == "forget":
            target.forget(cmd[1])
            pipe.send("ok")
        else:
            break
    target.close()
    kv.close()


def measure_transport(
    protocol: str, geometry: KVCacheGeometry, repeats: int, memcpy_gb_s: list[float]
) -> dict[str, tuple[float, float]]:
    """(best, median) GB/s per layout; appends one memcpy sample before every timed transfer."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=d_process, args=(protocol, geometry, child), daemon=True)
    proc.start()
    endpoint = parent.recv()
    kv = KVCache(geometry)
    kv.tensor.copy_(torch.randn(geometry.shape).to(geometry.torch_dtype))
    initiator = create_initiator(protocol)
    initiator.register(kv)
    initiator.connect("d", endpoint)
    n = geometry.num_blocks
    layouts = {
        "contig": list(range(n)),
        "scatter": torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist(),
    }
    results: dict[str, tuple[float, float]] = {}
    for name, dst in layouts.items():
        times: list[float] = []
        for rep in range(repeats):
            req_id = f"{name}-{rep}"
            parent.send(("expect", req_id, dst))
            parent.recv()
            memcpy_gb_s.append(measure_memcpy(geometry.total_bytes, 1))
            start = time.perf_counter()
            for layer in range(geometry.num_layers):
                initiator.write_layer("d", req_id, layer, list(range(n)), dst)
            initiator.finish("d", req_id)
            status = initiator.wait(req_id, 120.0)
            elapsed = time.perf_counter() - start
            if not status.is_done:
                raise RuntimeError(f"{protocol} {name}: {status}")
            times.append(elapsed)
            initiator.forget(req_id)
            parent.send(("forget", req_id))
            parent.recv()
        rates = [geometry.total_bytes / t / 1e9 for t in times]
        results[name] = (max(rates), statistics.median(rates))
    initiator.close()
    parent.send(("exit",))
    proc.join(timeout=30)
    return results


_MEMCPY_BUFFERS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def measure_memcpy(num_bytes: int, repeats: int) -> float:
    """Best GB/s of ``repeats`` copies; buffers are kept (and pre-faulted) across calls."""
    if num_bytes not in _MEMCPY_BUFFERS:
        src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8)
        _MEMCPY_BUFFERS.clear()
        _MEMCPY_BUFFERS[num_bytes] = (src, src.clone())
    src, dst = _MEMCPY_BUFFERS[num_bytes]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return num_bytes / best / 1e9


def socket_sink(port: int, num_bytes: int, repeats: int, chunk_bytes: int) -> None:
    """Child process: receive ``num_bytes`` ``repeats`` times with recv_into, ack each with one byte."""
    sock = socket.create_connection(("127.0.0.1", port))
    sink = memoryview(bytearray(chunk_bytes))
    for _ in range(repeats):
        left = num_bytes
        while left > 0:
            got = sock.recv_into(sink[: min(chunk_bytes, left)])
            if got == 0:
                raise ConnectionError("sender closed early")
            left -= got
        sock.sendall(b"k")
    sock.close()


def measure_socket(num_bytes: int, repeats: int, chunk_bytes: int = 4 << 20) -> float:
    """A raw loopback TCP stream to another process: sendall of ``chunk_bytes`` pieces."""
    listener = socket.create_server(("127.0.0.1", 0))
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=socket_sink, args=(listener.getsockname()[1], num_bytes, repeats, chunk_bytes))
    proc.start()
    sender, _ = listener.accept()
    payload = memoryview(bytearray(chunk_bytes))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        left = num_bytes
        while left > 0:
            sender.sendall(payload[: min(chunk_bytes, left)])
            left -= chunk_bytes
        if sender.recv(1) != b"k":
            raise ConnectionError("sink died")
        best = min(best, time.perf_counter() - start)
    proc.join(timeout=30)
    sender.close()
    listener.close()
    return num_bytes / best / 1e9


def row_ratio(row: dict[str, dict[str, tuple[float, float]]], memcpy_gb_s: float, which: int) -> str:
    return f"{row['ipc']['scatter'][which] / memcpy_gb_s:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--total-mib", type=int, default=64, help="KV bytes per measurement (all layers, K+V)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per transport and layout")
    parser.add_argument(
        "--block-tokens",
        type=int,
        action="append",
        help=f"rows to run (tokens per block, 2 KiB each); default {BLOCK_TOKENS}",
    )
    args = parser.parse_args()
    total = args.total_mib << 20
    print(
        f"{args.total_mib} MiB per measurement, {NUM_LAYERS} layers; transports best/median of {args.repeats}"
    )
    print(
        "memcpy = torch copy_ of the same bytes before every timed transfer (min/median/max of those samples);"
    )
    print(
        "socket = raw loopback TCP to another process, same bytes; x memcpy = ipc scatter best / memcpy max, and median / median"
    )
    header = (
        f"{'block':>8} {'blocks':>7} | {'memcpy min/med/max':>18} | {'ipc contig':>11} {'ipc scatter':>11} "
        f"{'x memcpy':>8} | {'socket':>6} {'tcp contig':>11} {'tcp scatter':>11}"
    )
    print(header)
    print("-" * len(header))
    for tokens in args.block_tokens or BLOCK_TOKENS:
        geometry = geometry_for(tokens, total)
        memcpy: list[float] = [measure_memcpy(geometry.total_bytes, 1)]
        raw_socket = measure_socket(geometry.total_bytes, args.repeats)
        row = {p: measure_transport(p, geometry, args.repeats, memcpy) for p in ("ipc", "tcp")}
        size = geometry.bytes_per_block
        label = f"{size >> 10} KiB" if size < 1 << 20 else f"{size >> 20} MiB"

        def pair(v: tuple[float, float]) -> str:
            return f"{v[0]:.2f}/{v[1]:.2f}"

        print(
            f"{label:>8} {geometry.num_blocks:>7} | "
            f"{f'{min(memcpy):.2f}/{statistics.median(memcpy):.2f}/{max(memcpy):.2f}':>18} | "
            f"{pair(row['ipc']['contig']):>11} {pair(row['ipc']['scatter']):>11} "
            f"{f'{row_ratio(row, max(memcpy), 0)}/{row_ratio(row, statistics.median(memcpy), 1)}':>16} | "
            f"{raw_socket:>6.2f} "
            f"{pair(row['tcp']['contig']):>11} {pair(row['tcp']['scatter']):>11}",
            flush=True,
        )


if __name__ == "__main__":
    main()
