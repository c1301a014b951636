"""A transfer peer in its own process, driven by JSON lines on stdin; replies one JSON line each.

    python tests/transfer/transfer_peer.py --role target|initiator --protocol tcp|ipc \
        --geometry '{"num_layers": ...}' --seed 7

Its KV cache starts as ``initial_kv(geometry, seed)`` so the test can rebuild exactly what every
block held before the transfer. Logs go to stderr; stdout carries only replies.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

import torch

from splitwise.codes import Protocol
from splitwise.engine.kv_cache import KVCache, KVCacheGeometry, default_shm_name
from splitwise.transfer import create_initiator, create_target
from splitwise.transfer.base import Endpoint, TransferState

# 4 layers x 2 x 32 blocks x 256 B = 64 KiB: small enough to dump and compare byte for byte.
GEOMETRY = KVCacheGeometry(
    num_layers=4, num_blocks=32, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32"
)


def initial_kv(geometry: KVCacheGeometry, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(geometry.shape, generator=generator).to(geometry.torch_dtype)


def make_cache(geometry: KVCacheGeometry, seed: int, *, shared: bool, device: str = "cpu") -> KVCache:
    shm_name = default_shm_name("splitwise-test") if shared and device == "cpu" else None
    kv = KVCache(geometry, device=device, shm_name=shm_name)
    kv.tensor.copy_(initial_kv(geometry, seed))
    return kv


def endpoint_to_json(endpoint: Endpoint) -> dict[str, Any]:
    """A typed endpoint as JSON for this test's pipe (JSON carries no bytes: hex)."""
    raw = dataclasses.asdict(endpoint)
    raw["cuda_ipc_handle"] = endpoint.cuda_ipc_handle.hex()
    return raw


def endpoint_from_json(raw: dict[str, Any]) -> Endpoint:
    fields = {**raw, "cuda_ipc_handle": bytes.fromhex(raw["cuda_ipc_handle"])}
    return Endpoint(
        **{**fields, "protocol": Protocol(raw["protocol"]), "geometry": KVCacheGeometry(**raw["geometry"])}
    )


def reply(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def wait_finished(side: Any, req_id: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    status = side.poll(req_id)
    while status.state is TransferState.PENDING and time.monotonic() < deadline:
        time.sleep(0.005)
        status = side.poll(req_id)
    return {"state": status.state.value, "reason": status.reason}


def serve(role: str, protocol: str, geometry: KVCacheGeometry, seed: int, device: str) -> None:
    kv = make_cache(geometry, seed, shared=(role == "target" and protocol == "ipc"), device=device)
    side: Any = create_target(protocol) if role == "target" else create_initiator(protocol)
    side.register(kv)
    reply(endpoint=endpoint_to_json(side.endpoint()) if role == "target" else None)
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "expect":
                side.expect(cmd["req_id"], cmd["blocks"], cmd.get("timeout_s"))
                reply(ok=True)
            elif op == "connect":
                side.connect(cmd["peer_id"], endpoint_from_json(cmd["endpoint"]))
                reply(ok=True)
            elif op == "write":
                side.write_layer(cmd["peer_id"], cmd["req_id"], cmd["layer"], cmd["src"], cmd["dst"])
                reply(ok=True)
            elif op == "finish":
                side.finish(cmd["peer_id"], cmd["req_id"])
                reply(ok=True)
            elif op == "wait":
                reply(**wait_finished(side, cmd["req_id"], cmd["timeout_s"]))
            elif op == "dump":
                reply(hex=kv.as_bytes().cpu().numpy().tobytes().hex())
            elif op == "counters":
                reply(**side.counters.snapshot())
            elif op == "exit":
                break
            else:
                reply(error=f"unknown op {op}")
    finally:
        side.close()
        kv.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=["target", "initiator"], required=True)
    parser.add_argument("--protocol", required=True)
    parser.add_argument("--geometry", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    serve(args.role, args.protocol, KVCacheGeometry(**json.loads(args.geometry)), args.seed, args.device)


if __name__ == "__main__":
    main()
