"""P/D equality over every transport, rdma included, in one process: P's engine prefills with the
real layer callback (ready token included) shipping through the transport, D decodes from what
landed, and the tokens equal a mixed engine's. rdma runs over the fake fabric with delayed DMA, so
its WRITEs execute after the post, as on a NIC (the multi-process P/D tests cover tcp and ipc
only: the fake fabric cannot span processes)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import torch
from transfer_pairs import TOKEN

from rdma.fake import FakeBackend, FakeFabric
from rdma.transport import RdmaInitiator, RdmaTarget
from splitwise.engine.config import EngineConfig
from splitwise.engine.engine import LLMEngine
from splitwise.engine.kv_cache import default_shm_name
from splitwise.engine.model_runner import ScheduledChunk
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.tiny_model import default_model_dir
from splitwise.transfer.base import ReadyToken, TransportInitiator, TransportOptions, TransportTarget
from splitwise.transfer.registry import create_initiator, create_target

BLOCK = 4


def engine(**overrides: object) -> LLMEngine:
    cfg: dict[str, object] = {
        "model": str(default_model_dir("tiny")),
        "block_size": BLOCK,
        "num_kv_blocks": 96,
        "max_num_batched_tokens": 16,  # long prompts prefill in several chunks
    }
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg))  # type: ignore[arg-type]


def transports(protocol: str) -> tuple[TransportInitiator, TransportTarget]:
    p_opts = TransportOptions(connect_timeout_s=5, node_id="p", cluster_token=TOKEN)
    d_opts = TransportOptions(connect_timeout_s=5, node_id="d", cluster_token=TOKEN)
    if protocol != "rdma":
        return create_initiator(protocol, p_opts), create_target(protocol, d_opts)
    rng = random.Random(3)
    fabric = FakeFabric(dma_delay_s=lambda: rng.uniform(0, 0.001))
    backend = FakeBackend(fabric.add_device("d0").add_device("p0").add_device("p1"))
    return (
        RdmaInitiator(
            p_opts, backend=backend, nics=["p0", "p1"], send_queue_depth=16, completion_timeout_s=10
        ),
        RdmaTarget(d_opts, backend=backend, nics=["d0"]),
    )


@pytest.mark.parametrize("protocol", ["tcp", "ipc", "rdma"])
def test_disaggregated_over_the_transport_equals_mixed(protocol: str) -> None:
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 900, (int(n),), generator=g).tolist() for n in (3, 17, 29, 8)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    mixed = engine().generate(prompts, params)
    p_eng = engine()
    d_eng = engine(kv_cache_shm_name=default_shm_name("splitwise-test") if protocol == "ipc" else None)
    initiator, target = transports(protocol)
    initiator.register(p_eng.kv_cache)
    target.register(d_eng.kv_cache)
    initiator.connect("d", target.endpoint())
    dst: dict[str, list[int]] = {}

    def on_layer(layer: int, chunks: Sequence[ScheduledChunk], ready: ReadyToken) -> None:
        for chunk in chunks:  # the block arithmetic of splitwise.instance.prefill_flow.on_layer
            seq = chunk.seq
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + chunk.num_new_tokens
            first = 0 if start == seq.num_cached_tokens else start // BLOCK
            last = min((end - 1) // BLOCK, len(dst[seq.req_id]) - 1)
            src_ids = seq.block_table[first : last + 1]
            initiator.write_layer("d", seq.req_id, layer, src_ids, dst[seq.req_id][first : last + 1], ready)

    p_eng.set_layer_callback(on_layer)
    try:
        for i, prompt in enumerate(prompts):
            req_id = f"r{i}"
            dst[req_id] = d_eng.reserve(req_id, len(prompt) + 8)[: -(-len(prompt) // BLOCK)]
            target.expect(req_id, dst[req_id], timeout_s=30)
            p_eng.add_request(req_id, prompt, params, prefill_only=True)
        firsts = {}
        while p_eng.has_unfinished():
            for out in p_eng.step():
                if out.finished:
                    firsts[out.req_id] = out
                    initiator.finish("d", out.req_id)
        tokens: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            req_id = f"r{i}"
            assert initiator.wait(req_id, 30).is_done, initiator.poll(req_id)
            assert target.poll(req_id).is_done
            out = firsts[req_id]
            d_eng.add_prefilled_request(req_id, prompt, params, out.new_token_ids[0], out.new_logprobs[0])
            tokens[req_id] = [out.new_token_ids[0]]
            p_eng.release_prefill(req_id)
        while d_eng.has_unfinished():
            for out in d_eng.step():
                tokens[out.req_id] += out.new_token_ids
        assert [tokens[f"r{i}"] for i in range(len(prompts))] == [m.token_ids for m in mixed]
    finally:
        initiator.close()
        target.close()
        p_eng.close()
        d_eng.close()
