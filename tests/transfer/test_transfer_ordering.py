"""The ordering rule of the Transport contract (#11): no transport reads a layer's source blocks
before the producer's ready token completed.

The producer here is ``FakeStream``, a 'GPU' stream over host memory: the new KV bytes reach P's
blocks only when the stream runs the queued write, as on CUDA, where the layer callback fires when
the kernels are queued. Without the event (``ready=COMPLETED`` passed for memory that is not yet
written) the transfer completes with the stale bytes: the fake catches the bug. With the event,
nothing lands and nothing completes before the stream ran, and then the new bytes land.
"""

from __future__ import annotations

import pytest
import torch
from transfer_pairs import GEOMETRY, PROTOCOLS, Pair, make_pair

from splitwise.engine.layer_ready import COMPLETED, ReadyToken
from splitwise.testing.fake_device import FakeStream

SRC, DST = [2, 3, 4, 9], [10, 11, 12, 1]


def produce(pair: Pair, stream: FakeStream, layer: int, seed: int) -> tuple[ReadyToken, torch.Tensor]:
    """Queue the 'kernel' that writes layer ``layer``'s K and V of SRC; returns its event and the
    bytes it will write."""
    generator = torch.Generator().manual_seed(seed)
    new = torch.randn(pair.p_kv.tensor[layer][:, SRC].shape, generator=generator).to(pair.p_kv.tensor.dtype)
    event = None
    for i, block in enumerate(SRC):  # basic indexing: views of P's blocks (fancy indexing copies)
        event = stream.write(pair.p_kv.tensor[layer, :, block], new[:, i])
    assert event is not None
    return event, new  # the stream runs in order: the last write's event covers the layer


def ship(pair: Pair, req_id: str, tokens: list[ReadyToken]) -> None:
    for layer, token in enumerate(tokens):
        pair.initiator.write_layer("d", req_id, layer, SRC, DST, token)
    pair.initiator.finish("d", req_id)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_missing_event_ships_stale_kv(protocol: str) -> None:
    with make_pair(protocol) as pair:
        stream = FakeStream()  # manual: the 'kernels' run only when the test says
        stale = pair.p_blocks(SRC)
        new = [produce(pair, stream, layer, seed=layer)[1] for layer in range(GEOMETRY.num_layers)]
        pair.target.expect("r", DST, timeout_s=10)
        ship(pair, "r", [COMPLETED] * GEOMETRY.num_layers)  # the bug: "valid now" although queued
        assert pair.initiator.wait("r", 10).is_done
        landed = pair.d_blocks(DST)
        stream.run()
        assert torch.equal(landed, stale)  # D got what was in P's blocks before the kernels ran
        assert not torch.equal(landed[0], new[0].view(torch.int16))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_with_the_event_nothing_is_read_before_the_stream_ran(protocol: str) -> None:
    with make_pair(protocol) as pair:
        stream = FakeStream()
        before = pair.d_blocks(DST)
        made = [produce(pair, stream, layer, seed=10 + layer) for layer in range(GEOMETRY.num_layers)]
        pair.target.expect("r", DST, timeout_s=10)
        ship(pair, "r", [token for token, _ in made])
        # Whatever the threads do meanwhile, they cannot finish or write D before the events:
        assert not pair.initiator.wait("r", 0.2).is_finished
        assert pair.target.poll("r").state.value == "pending"
        assert torch.equal(pair.d_blocks(DST), before)
        stream.run()
        assert pair.initiator.wait("r", 10).is_done and pair.target.poll("r").is_done
        landed = pair.d_blocks(DST)
        for layer, (_, values) in enumerate(made):
            assert torch.equal(landed[layer], values.view(torch.int16))


def test_rdma_fake_nic_reads_the_source_when_the_write_executes_not_when_posted() -> None:
    """The fake fabric's delayed DMA: bytes changed after the post but before the NIC ran the WR
    are the bytes that land (what a real NIC does, and why the ready token matters)."""
    with make_pair("rdma", dma_delay_s=0.0) as pair:
        assert pair.fabric is not None
        pair.fabric.pause()
        pair.target.expect("r", DST, timeout_s=10)
        ship(pair, "r", [COMPLETED] * GEOMETRY.num_layers)
        # The worker posts once it has D's grant; the paused NIC reads nothing until resume().
        assert not pair.initiator.wait("r", 0.2).is_finished
        changed = torch.full_like(pair.p_kv.tensor[:, :, SRC], 7.0)
        pair.p_kv.tensor[:, :, SRC] = changed
        pair.fabric.resume()
        assert pair.initiator.wait("r", 10).is_done
        assert torch.equal(pair.d_blocks(DST), changed.view(torch.int16))


@pytest.mark.gpu
def test_cuda_layer_token_completes_only_after_the_layer_ran() -> None:
    """On a GPU: the token recorded at the callback site is not complete while the layer's kernels
    still run (a spin kernel stands in for them), and completes after."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the token is a torch.cuda.Event only there")
    from splitwise.engine.layer_ready import record_layer_ready

    torch.cuda._sleep(200_000_000)  # type: ignore[attr-defined]  # ~0.1 s of GPU time
    token = record_layer_ready(torch.device("cuda"))
    assert not token.query()
    token.synchronize()
    assert token.query()


@pytest.mark.gpu
def test_tcp_from_gpu_memory_waits_for_the_layer_event() -> None:
    """On a GPU: tcp stages CUDA KV through pinned host memory; each layer is written behind a spin
    kernel on a side stream and shipped with its event: D gets the new bytes, never stale ones."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: tcp's device staging path")
    from splitwise.engine.kv_cache import KVCache
    from splitwise.engine.layer_ready import record_layer_ready
    from splitwise.transfer.base import TransportOptions
    from splitwise.transfer.registry import create_initiator, create_target

    p_kv, d_kv = KVCache(GEOMETRY, device="cuda"), KVCache(GEOMETRY, device="cuda")
    target, initiator = create_target("tcp", TransportOptions()), create_initiator("tcp", TransportOptions())
    target.register(d_kv)
    initiator.register(p_kv)
    compute = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    try:
        initiator.connect("d", target.endpoint())
        target.expect("g", DST, timeout_s=30)
        with torch.cuda.stream(compute):
            for layer in range(GEOMETRY.num_layers):
                torch.cuda._sleep(20_000_000)  # type: ignore[attr-defined]
                p_kv.tensor[layer, :, SRC] = float(layer + 1)
                initiator.write_layer("d", "g", layer, SRC, DST, record_layer_ready(p_kv.device))
        initiator.finish("d", "g")
        assert initiator.wait("g", 30).is_done
        for layer in range(GEOMETRY.num_layers):
            assert bool((d_kv.tensor[layer, :, DST] == float(layer + 1)).all())
    finally:
        initiator.close()
        target.close()
