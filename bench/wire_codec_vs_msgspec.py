"""Encode/decode speed of splitwise.wire_codec against msgspec (msgspec.Struct + msgpack) on the
messages that matter: a LayerWrite header (the data plane's per-layer frame, thousands of ints in
a long prompt), a PrefillTask (nested SamplingParams) and a TokenChunk (the result stream).

Both sides check the same things on decode: schema version, tag, field set and field types.
Runs are interleaved (A, B, A, B, ...) and reported as the ratio msgspec / wire_codec, so machine
load cancels out. msgspec is not a dependency of splitwise: ``pip install msgspec`` to run this.

    python bench/wire_codec_vs_msgspec.py [--rounds 7] [--n 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from scheduler.messages import TokenChunk
from scheduler.messages import decode as sched_decode
from scheduler.messages import encode as sched_encode
from splitwise.engine.sampling_params import SamplingParams
from splitwise.kv_geometry import KVGeometry
from splitwise.transfer import messages
from splitwise.transfer.base import Endpoint


class MSamplingParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False


class MKVGeometry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_blocks: int = 0


class MEndpoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    protocol: str
    host: str
    port: int
    geometry: MKVGeometry
    access_key: str = ""
    schema: int = 0
    device: str = "cpu"
    shm_name: str = ""
    cuda_ipc_handle: bytes = b""
    cuda_offset_bytes: int = 0


class MLayerWrite(msgspec.Struct, frozen=True, tag="layer_write", forbid_unknown_fields=True):
    v: Literal[2]
    req_id: str
    layer: int
    runs: list[list[int]]
    payload_bytes: int


class MPrefillTask(msgspec.Struct, frozen=True, tag="prefill_task", forbid_unknown_fields=True):
    v: Literal[2]
    call_id: int
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: MSamplingParams
    dst_block_ids: list[int]
    protocol: str
    endpoint: MEndpoint


class MTokenChunk(msgspec.Struct, frozen=True, tag="tokens", forbid_unknown_fields=True):
    v: Literal[1]
    req_id: str
    attempt: int
    index: int
    token_ids: list[int]
    logprobs: list[float] | None = None


ENDPOINT = Endpoint("tcp", "h", 1, KVGeometry("bfloat16", 16, 28, 8, 128, 4096), access_key="9f" * 16)
MENDPOINT = MEndpoint("tcp", "h", 1, MKVGeometry("bfloat16", 16, 28, 8, 128, 4096), access_key="9f" * 16)


def timed(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6  # µs per call


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()

    runs = [[4 * i, 3] for i in range(512)]  # a 2k-block prompt in 512 runs
    prompt = list(range(4000))
    params = SamplingParams(max_tokens=64, temperature=0.7, stop=("\n\n",), stop_token_ids=(2,))
    ours: dict[str, tuple[Any, Callable[[bytes], Any], Callable[[Any], bytes]]] = {
        "LayerWrite(512 runs)": (
            messages.LayerWrite("r-1", 3, runs, 1 << 20),
            messages.decode,
            messages.encode,
        ),
        "PrefillTask(4k prompt)": (
            messages.PrefillTask(0, "r-1", prompt, params, list(range(1000)), "tcp", ENDPOINT),
            messages.decode,
            messages.encode,
        ),
        "TokenChunk(8 tokens)": (
            TokenChunk("r-1", 1, 40, list(range(8)), [-0.5] * 8),
            sched_decode,
            sched_encode,
        ),
    }
    mparams = MSamplingParams(64, 0.7, 1.0, 0, None, ("\n\n",), (2,))
    theirs: dict[str, Any] = {
        "LayerWrite(512 runs)": MLayerWrite(2, "r-1", 3, runs, 1 << 20),
        "PrefillTask(4k prompt)": MPrefillTask(
            2, 0, "r-1", prompt, mparams, list(range(1000)), "tcp", MENDPOINT
        ),
        "TokenChunk(8 tokens)": MTokenChunk(1, "r-1", 1, 40, list(range(8)), [-0.5] * 8),
    }
    print(f"{'message':24} {'op':7} {'wire_codec µs':>14} {'msgspec µs':>11} {'ratio':>6}")
    for name, (message, decode, encode) in ours.items():
        compare(name, message, decode, encode, theirs[name], args.rounds, args.n)


def compare(
    name: str,
    message: Any,
    decode: Callable[[bytes], Any],
    encode: Callable[[Any], bytes],
    other: Any,
    rounds: int,
    n: int,
) -> None:
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(type(other))
    data, other_data = encode(message), encoder.encode(other)
    assert decode(data) == message and decoder.decode(other_data) == other
    for op, a, b in (
        ("encode", lambda: encode(message), lambda: encoder.encode(other)),
        ("decode", lambda: decode(data), lambda: decoder.decode(other_data)),
    ):
        ta, tb = [], []
        for _ in range(rounds):  # interleaved: load changes hit both sides alike
            ta.append(timed(a, n))
            tb.append(timed(b, n))
        ma, mb = statistics.median(ta), statistics.median(tb)
        print(f"{name:24} {op:7} {ma:14.2f} {mb:11.2f} {mb / ma:6.2f}")


if __name__ == "__main__":
    main()
