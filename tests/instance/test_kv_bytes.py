"""The bytes in D's blocks after a transfer equal the bytes a local prefill writes.

One process, three real engines (tiny model, block size 4, a step budget of 8 tokens so longer
prompts are prefilled in chunks and shipped layer by layer per chunk):

    P  LLMEngine + EngineWorker + PrefillFlow (the real layer callback) + PDChannel (control server)
       + a real transport initiator (ipc or tcp, from the registry)
    D  LLMEngine (KV cache in shared memory for ipc) + the matching real transport target; D
       reserves blocks, ``expect``s them and sends the PrefillTask over a real, authenticated
       control connection, exactly the messages the decode flow sends
    R  a reference LLMEngine that prefills the same prompts locally, in the same order (so its
       prefix-cache hits and chunk boundaries are P's: the bytes must then be identical)

For every prompt: every layer, K and V, every slot that holds a prompt token, byte for byte; the
first token P reports equals R's; the reserved headroom blocks on D stay untouched (zero). Also
with P's hidden unpipelined mode (every layer shipped after the prefill; bench/pd_ttft.py's baseline).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from splitwise.counters import Counters
from splitwise.engine.config import EngineConfig
from splitwise.engine.engine import LLMEngine
from splitwise.engine.kv_cache import default_shm_name
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import FinishReason
from splitwise.instance.engine_worker import EngineWorker
from splitwise.instance.pd_channel import PDChannel
from splitwise.instance.prefill_flow import PrefillFlow
from splitwise.transfer.base import TransportOptions
from splitwise.transfer.control import connect_control
from splitwise.transfer.control_connection import ControlConnection
from splitwise.transfer.messages import CallMessage, Compatibility, PrefillResult, PrefillTask
from splitwise.transfer.registry import create_initiator, create_target

BLOCK_SIZE = 4
CHUNK_TOKENS = 8  # max_num_batched_tokens: a 30-token prompt takes 4 steps
TOKEN = "kv-bytes-test-token"
HEADROOM_TOKENS = 8  # D reserves the prompt plus two more blocks that P must never touch
SHARED_PREFIX = [(7 * i + 3) % 500 + 3 for i in range(24)]  # 6 full blocks
PROMPTS = {
    "one-token": [42],
    "one-block": [5, 6, 7, 8],
    "one-chunk": [(3 * i) % 700 + 3 for i in range(CHUNK_TOKENS - 1)],
    "chunked": SHARED_PREFIX + [11, 12, 13, 14, 15, 16],  # 30 tokens: 4 chunks, ends mid-block
    # Same 24-token prefix: P and R serve its 6 blocks from the prefix cache, and P must still
    # ship them (they were computed by the previous request, not by this prefill).
    "prefix-hit": SHARED_PREFIX + [(5 * i) % 600 + 3 for i in range(17)],
}


def _engine_config(model: Path, **changes: object) -> EngineConfig:
    base = EngineConfig(
        model=str(model),
        block_size=BLOCK_SIZE,
        max_num_batched_tokens=CHUNK_TOKENS,
        num_kv_blocks=96,
        enable_prefix_caching=True,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def _compat(engine: LLMEngine) -> Compatibility:
    return Compatibility("tiny", engine.kv_cache.geometry)


def _local_prefill(
    engine: LLMEngine, req_id: str, prompt: list[int], params: SamplingParams
) -> tuple[list[int], int, int]:
    """Prefill on R the way a mixed instance does (prefill-only keeps the blocks for reading)."""
    engine.add_request(req_id, prompt, params, prefill_only=True)
    while True:
        for out in engine.step():
            if out.req_id == req_id and out.finished:
                assert out.finish_reason is FinishReason.PREFILL_DONE, out
                return list(out.block_ids), out.new_token_ids[0], out.num_cached_tokens


@dataclasses.dataclass
class Landed:
    dst_block_ids: list[int]
    headroom_block_ids: list[int]
    first_token_id: int


class PrefillSide:
    """P: the real PrefillFlow behind a real control server, on this test's event loop."""

    def __init__(self, engine: LLMEngine, protocol: str, *, pipelined: bool) -> None:
        self.engine = engine
        self.worker = EngineWorker(engine, asyncio.get_running_loop())
        self.initiator = create_initiator(protocol, TransportOptions())
        self.initiator.register(engine.kv_cache)
        self.counters = Counters()
        self.channel = PDChannel(
            node_id="p0",
            token=TOKEN,
            compat=_compat(engine),
            on_message=lambda conn, msg: self.flow.handle(conn, msg),
        )
        self.flow = PrefillFlow(
            self.worker,
            self.channel,
            {protocol: self.initiator},
            self.counters,
            transfer_timeout_s=20.0,
            pipelined=pipelined,
        )
        self.worker.start()

    async def close(self) -> None:
        await self.channel.close()
        self.initiator.close()
        self.worker.stop()


class DecodeSide:
    """D: reserve -> expect -> PrefillTask over the control channel -> result -> poll DONE."""

    def __init__(self, engine: LLMEngine, protocol: str) -> None:
        self.engine = engine
        self.protocol = protocol
        self.target = create_target(protocol, TransportOptions())
        self.target.register(engine.kv_cache)
        self.replies: asyncio.Queue[CallMessage] = asyncio.Queue()

    async def connect(self, p_port: int) -> DecodeSide:
        self.conn: ControlConnection = await connect_control(
            "127.0.0.1",
            p_port,
            node_id="d0",
            token=TOKEN,
            compat=_compat(self.engine),
            handler=lambda _conn, msg: self.replies.put_nowait(msg),
        )
        return self

    async def transfer(self, req_id: str, prompt: list[int], params: SamplingParams) -> Landed:
        reserved = self.engine.reserve(req_id, len(prompt) + HEADROOM_TOKENS)
        num_prompt_blocks = -(-len(prompt) // BLOCK_SIZE)
        dst, headroom = reserved[:num_prompt_blocks], reserved[num_prompt_blocks:]
        self.target.expect(req_id, dst, timeout_s=20.0)
        task = PrefillTask(
            call_id=0,
            req_id=req_id,
            prompt_token_ids=prompt,
            sampling_params=params,
            dst_block_ids=dst,
            protocol=self.protocol,
            endpoint=self.target.endpoint(),
        )
        await self.conn.call(task, 10.0)
        reply = await asyncio.wait_for(self.replies.get(), 30.0)
        assert isinstance(reply, PrefillResult), f"P answered {reply!r}"
        assert reply.req_id == req_id
        status = self.target.poll(req_id)
        assert status.is_done, status
        self.target.forget(req_id)
        return Landed(dst, headroom, reply.first_token_id)

    async def close(self) -> None:
        await self.conn.close("test done")
        self.target.close()


@pytest.fixture()
def engines(
    tiny_model: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[LLMEngine, LLMEngine, LLMEngine]]:
    protocol = request.param
    p = LLMEngine(_engine_config(tiny_model))
    d = LLMEngine(
        _engine_config(tiny_model, kv_cache_shm_name=default_shm_name() if protocol == "ipc" else None)
    )
    r = LLMEngine(_engine_config(tiny_model))
    yield p, d, r
    for engine in (p, d, r):
        engine.close()


def _prompt_slots(kv: torch.Tensor, block_ids: list[int], num_tokens: int) -> torch.Tensor:
    """[layers, K/V, num_tokens, kv_heads, head_dim]: the KV of prompt positions 0..num_tokens-1.

    position i lives in block ``block_ids[i // BLOCK_SIZE]``, slot ``i % BLOCK_SIZE``.
    """
    rows = [kv[:, :, block_ids[i // BLOCK_SIZE], i % BLOCK_SIZE] for i in range(num_tokens)]
    return torch.stack(rows, dim=2)


@pytest.mark.parametrize("pipelined", [True, False], ids=["layer-pipelined", "unpipelined"])
@pytest.mark.parametrize("engines", ["ipc", "tcp"], indirect=True)
def test_transferred_kv_bytes_equal_local_prefill(
    engines: tuple[LLMEngine, LLMEngine, LLMEngine], pipelined: bool
) -> None:
    p_engine, d_engine, r_engine = engines
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    protocol = "ipc" if d_engine.kv_cache.shm_name else "tcp"

    async def run() -> dict[str, tuple[Landed, list[int], int, int]]:
        p_side = PrefillSide(p_engine, protocol, pipelined=pipelined)
        await p_side.channel.start("127.0.0.1", 0)
        d_side = await DecodeSide(d_engine, protocol).connect(p_side.channel.port)
        results = {}
        try:
            for name, prompt in PROMPTS.items():
                landed = await d_side.transfer(name, prompt, params)
                r_blocks, r_first, r_cached = _local_prefill(r_engine, name, prompt, params)
                results[name] = (landed, r_blocks, r_first, r_cached)
        finally:
            await d_side.close()
            await p_side.close()
        assert p_side.counters.get("prefills_shipped") == len(PROMPTS)
        return results

    results = asyncio.run(run())
    # The prefix-hit prompt really was served from P's prefix cache (R mirrors P's history).
    assert results["prefix-hit"][3] == len(SHARED_PREFIX)
    assert p_engine.stats.num_cached_prompt_tokens >= len(SHARED_PREFIX)
    d_kv, r_kv = d_engine.kv_cache.tensor, r_engine.kv_cache.tensor
    for name, (landed, r_blocks, r_first, _) in results.items():
        prompt = PROMPTS[name]
        got = _prompt_slots(d_kv, landed.dst_block_ids, len(prompt))
        want = _prompt_slots(r_kv, r_blocks, len(prompt))
        assert bool(want.abs().sum() > 0), f"{name}: the reference KV is all zeros (nothing was prefilled)"
        mismatched = (
            (got.view(torch.uint8) != want.view(torch.uint8)).flatten(2).any(dim=2).nonzero().tolist()
        )
        assert not mismatched, f"{name}: (layer, kind) pairs whose prompt KV differs on D: {mismatched}"
        assert landed.first_token_id == r_first, name
        for block in landed.headroom_block_ids:
            assert not bool(d_kv[:, :, block].any()), f"{name}: headroom block {block} was written"
