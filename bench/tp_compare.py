"""Tensor parallelism on this machine (#14): engine throughput at TP=1 vs TP=2, and the cost of
remapping KV heads between instances of different TP sizes.

    .venv/bin/python bench/tp_compare.py [--model DIR] [--rounds 2] [--batch 4] [--prompt-len 256]
                                         [--max-tokens 32] [--threads 1] [--transfer-tokens 1024]

Engine: the same batch of greedy requests through LLMEngine at TP=1 and TP=2 (ranks are real
processes over gloo), interleaved for ``--rounds``; prefill tok/s (prompt tokens / time to the
first token of the batch, measured with max_tokens=1) and decode tok/s (generated tokens / the
rest). ``--threads`` is torch's thread count PER RANK: TP=2 uses twice as many cores.

Transfer: one request of ``--transfer-tokens`` tokens over the in-process tcp and ipc transports,
per (P tp, D tp), for a model with one KV head (the only case that remaps: TP 2 keeps a replica
per rank) and 4 KV heads (TP 2 splits them: the same bytes as TP 1, no remap). The four pairs of
one model and protocol are timed round-robin; prints the bytes landed in D, the median ms per
request, and the ratio to the equal-TP copy into the same D layout (the remap's overhead).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from splitwise.engine.config import EngineConfig
from splitwise.engine.engine import LLMEngine
from splitwise.engine.kv_cache import KVCache, default_shm_name
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.tiny_model import default_model_dir
from splitwise.kv_geometry import KVGeometry
from splitwise.transfer.base import TransferState, TransportOptions
from splitwise.transfer.registry import create_initiator, create_target


def engine_round(model: str, tp: int, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
    engine = LLMEngine(
        EngineConfig(model=model, tensor_parallel_size=tp, num_kv_blocks=1024, max_num_batched_tokens=2048)
    )
    try:
        engine.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
        start = time.perf_counter()
        engine.generate([p + [1] for p in prompts], SamplingParams(max_tokens=1, temperature=0.0))
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        out = engine.generate(
            [p + [2] for p in prompts],
            SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        )
        total_s = time.perf_counter() - start
    finally:
        engine.close()
    num_prompt = sum(len(p) + 1 for p in prompts)
    num_generated = sum(len(o.token_ids) for o in out)
    return num_prompt / prefill_s, (num_generated - len(prompts)) / max(total_s - prefill_s, 1e-9)


def geometry(model_heads: int, tp: int, num_blocks: int) -> KVGeometry:
    # The built-in small model's shape (8 layers, head_dim 64), 16-token blocks.
    return KVGeometry(
        dtype="float32",
        block_size=16,
        num_layers=8,
        num_kv_heads=max(model_heads, tp),
        head_dim=64,
        num_blocks=num_blocks,
        tp_size=tp,
        model_kv_heads=model_heads,
    )


class TransferPair:
    """One P -> D transport pair of given geometries, connected once, timed one request at a time."""

    def __init__(self, protocol: str, p_geo: KVGeometry, d_geo: KVGeometry, num_blocks: int) -> None:
        self.protocol, self.p_geo, self.d_geo = protocol, p_geo, d_geo
        self.blocks = list(range(num_blocks))
        self.p_kv = KVCache(p_geo)
        shm = default_shm_name("splitwise-bench") if protocol == "ipc" else None
        self.d_kv = KVCache(d_geo, shm_name=shm)
        options = {"connect_timeout_s": 10.0, "cluster_token": "bench"}
        self.target = create_target(protocol, TransportOptions(node_id="d", **options))  # type: ignore[arg-type]
        self.initiator = create_initiator(protocol, TransportOptions(node_id="p", **options))  # type: ignore[arg-type]
        self.target.register(self.d_kv)
        self.initiator.register(self.p_kv)
        self.initiator.connect("d", self.target.endpoint())
        self.times_ms: list[float] = []
        self._num_requests = 0

    @property
    def nbytes(self) -> int:
        """Bytes landed in D per request (D's layout: what the wire or the copy writes)."""
        return 2 * self.d_geo.num_layers * len(self.blocks) * self.d_geo.bytes_per_block

    def one_request(self) -> None:
        req = f"r{self._num_requests}"
        self._num_requests += 1
        self.target.expect(req, self.blocks, 30.0)
        start = time.perf_counter()
        for layer in range(self.p_geo.num_layers):
            self.initiator.write_layer("d", req, layer, self.blocks, self.blocks)
        self.initiator.finish("d", req)
        if self.initiator.wait(req, 30.0).state is not TransferState.DONE:
            raise RuntimeError(f"{self.protocol} transfer failed")
        self.times_ms.append((time.perf_counter() - start) * 1000)
        self.initiator.forget(req)
        self.target.forget(req)

    def close(self) -> None:
        self.initiator.close()
        self.target.close()
        self.d_kv.close()


def transfer_table(num_blocks: int, repeats: int) -> None:
    """Per (model KV heads, protocol): the four (P tp, D tp) pairs timed round-robin, one request
    each per round (a loaded machine slows them alike), and each one's ratio to the equal-TP copy
    into the same D layout: (1,2) against (2,2), (2,1) against (1,1) -- the remap's overhead."""
    configs = ((1, 1), (2, 2), (1, 2), (2, 1))
    for model_heads in (1, 4):
        for protocol in ("tcp", "ipc"):
            pairs = {
                (p, d): TransferPair(
                    protocol,
                    geometry(model_heads, p, num_blocks),
                    geometry(model_heads, d, num_blocks),
                    num_blocks,
                )
                for p, d in configs
            }
            try:
                for _ in range(repeats):
                    for pair in pairs.values():
                        pair.one_request()
            finally:
                for pair in pairs.values():
                    pair.close()
            for (p_tp, d_tp), pair in pairs.items():
                ms = statistics.median(pair.times_ms)
                same_layout = statistics.median(pairs[(d_tp, d_tp)].times_ms)
                remap = "remap" if pair.p_geo.needs_head_remap(pair.d_geo) else "copy "
                print(
                    f"  kv_heads={model_heads} {protocol:<3} P tp={p_tp} -> D tp={d_tp}: {remap} "
                    f"{pair.nbytes / 1e6:7.2f} MB  {ms:8.2f} ms  x{ms / same_layout:.2f} of tp {d_tp}->{d_tp}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="default: the built-in small model")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--transfer-tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-engine", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_engine:
        model = args.model or str(default_model_dir("small"))
        prompts = [[(7 * b + 13 * i) % 8000 + 3 for i in range(args.prompt_len)] for b in range(args.batch)]
        results: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
        for _ in range(args.rounds):
            for tp in (1, 2):
                results[tp].append(engine_round(model, tp, prompts, args.max_tokens))
        print(
            f"engine ({model}, batch {args.batch} x {args.prompt_len} tokens, {args.threads} thread(s) per rank)"
        )
        for tp, rows in results.items():
            prefill = statistics.median(r[0] for r in rows)
            decode = statistics.median(r[1] for r in rows)
            print(
                f"  TP={tp}: prefill {prefill:8.1f} tok/s   decode {decode:7.1f} tok/s   ({len(rows)} rounds)"
            )
        base = [statistics.median(r[i] for r in results[1]) for i in (0, 1)]
        tp2 = [statistics.median(r[i] for r in results[2]) for i in (0, 1)]
        print(f"  TP=2 / TP=1: prefill x{tp2[0] / base[0]:.2f}   decode x{tp2[1] / base[1]:.2f}")
    num_blocks = -(-args.transfer_tokens // 16)
    print(
        f"\ntransfer of one {args.transfer_tokens}-token request (8 layers, head_dim 64, fp32), median of {args.repeats}"
    )
    transfer_table(num_blocks, args.repeats)


if __name__ == "__main__":
    main()
