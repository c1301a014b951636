"""Fenced cancels (#11): D never reuses a block while a write into it can still land.

The protocol the flows run on a cancel or timeout, driven here directly against the transports:

    ack path      D: target.forget(r) -> P: initiator.forget(r) returns (nothing more can land)
                  = P's acknowledgement -> D releases the blocks
    timeout path  D: target.forget(r) -> no ack -> target.revoke(P) returns True -> D releases;
                  P's forget (or more write_layer calls) may come later, even after the release

"Release" writes a sentinel into the request's blocks (another request reusing them). Producer
tokens complete after random delays (FakeStream) and, for rdma, the fake NIC executes each WRITE
after a random delay, so cancels land at random points: before the grant, while WRITEs are queued
or in flight, between layers, after the finish. After the fabric and the producer went idle, every
released block must still hold its sentinel: zero bytes landed after a release.
"""

from __future__ import annotations

import random

import pytest
import torch
from transfer_pairs import GEOMETRY, P_NODE, PROTOCOLS, Pair, make_pair

from splitwise.engine.layer_ready import COMPLETED
from splitwise.testing.fake_device import FakeStream
from splitwise.transfer.errors import TransferError

ITERATIONS = 150


def release(pair: Pair, block_ids: list[int], value: int) -> torch.Tensor:
    """D hands the blocks to another request: it writes them (a recognisable pattern)."""
    pair.d_kv.tensor[:, :, block_ids] = torch.tensor(value, dtype=torch.int16).view(torch.float16)
    return pair.d_blocks(block_ids)


def one_cancel(
    pair: Pair, rng: random.Random, stream: FakeStream, index: int
) -> tuple[list[int], torch.Tensor]:
    req_id = f"r{index}"
    blocks = rng.sample(range(GEOMETRY.num_blocks), rng.randint(1, 6))
    src = rng.sample(range(GEOMETRY.num_blocks), len(blocks))
    pair.connect()  # no-op when connected; after a revoke, a fresh (authenticated) connection
    pair.target.expect(req_id, blocks, timeout_s=30)
    num_before = rng.randint(0, GEOMETRY.num_layers)  # layers issued before the cancel
    finish = num_before == GEOMETRY.num_layers and rng.random() < 0.5

    def write(layer: int) -> None:
        token = stream.write(pair.p_kv.tensor[layer, 0, src[0]], pair.p_kv.tensor[layer, 0, src[0]])
        try:
            pair.initiator.write_layer(
                "d", req_id, layer, src, blocks, token if rng.random() < 0.8 else COMPLETED
            )
        except TransferError:
            pass  # the connection was revoked: refused, which is fine

    for layer in range(num_before):
        write(layer)
    if finish:
        pair.initiator.finish("d", req_id)
    pair.target.forget(req_id)
    if rng.random() < 0.6:  # P answers the cancel: its forget is the acknowledgement
        pair.initiator.forget(req_id)
        sentinel = release(pair, blocks, 0x5A00 + index % 200)
    else:  # no answer in time: revoke P's access, then release
        assert pair.target.revoke(P_NODE)
        sentinel = release(pair, blocks, 0x3C00 + index % 200)
        pair.initiator.forget(req_id)  # P learns of the cancel late
    for layer in range(num_before, min(GEOMETRY.num_layers, num_before + rng.randint(0, 2))):
        write(layer)  # the engine thread may still call write_layer for a cancelled request
    return blocks, sentinel


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_no_byte_lands_in_released_blocks_under_random_cancel_timings(protocol: str) -> None:
    rng = random.Random(f"fencing-{protocol}")
    with make_pair(protocol, dma_delay_s=lambda: rng.uniform(0, 0.002)) as pair:
        stream = FakeStream(delay_s=lambda: rng.uniform(0, 0.002))
        try:
            for index in range(ITERATIONS):
                blocks, sentinel = one_cancel(pair, rng, stream, index)
                # Let everything that could still land do so, then check nothing did.
                assert stream.wait_idle(10)
                pair.initiator.forget(f"r{index}")
                if pair.fabric is not None:
                    assert pair.fabric.wait_idle(10)
                assert torch.equal(pair.d_blocks(blocks), sentinel), (
                    f"iteration {index}: bytes landed after release"
                )
        finally:
            stream.close()
    assert pair.target.counters.get("revokes") > 0


def test_without_the_fence_rdma_writes_land_in_released_blocks() -> None:
    """The control: releasing after D's forget alone (no ack, no revoke) lets queued WRITEs land."""
    with make_pair("rdma", dma_delay_s=0.0) as pair:
        assert pair.fabric is not None
        blocks, src = [3, 4, 5], [7, 8, 9]
        pair.target.expect("r", blocks, timeout_s=10)
        pair.fabric.pause()  # the NIC holds the WRITEs the worker posts
        for layer in range(GEOMETRY.num_layers):
            pair.initiator.write_layer("d", "r", layer, src, blocks)
        for _ in range(200):
            if pair.fabric.num_in_flight:
                break
            pair.initiator.wait("r", 0.01)
        assert pair.fabric.num_in_flight > 0
        pair.target.forget("r")
        sentinel = release(pair, blocks, 0x1100)  # the bug: no fence
        pair.fabric.resume()
        assert pair.fabric.wait_idle(10)
        assert not torch.equal(pair.d_blocks(blocks), sentinel)


def test_abort_peer_stops_posting_and_fails_the_requests() -> None:
    """P's control connection to D dropped: abort_peer stops every write to D (queued ones are
    never posted) and returns once what was posted has drained."""
    with make_pair("rdma", dma_delay_s=0.0) as pair:
        assert pair.fabric is not None
        stream = FakeStream()  # manual: layer 1's token stays incomplete until the test runs it
        blocks, src = [3, 4], [7, 8]
        pair.target.expect("r", blocks, timeout_s=10)
        before = pair.d_blocks(blocks)
        pair.fabric.pause()
        pair.initiator.write_layer("d", "r", 0, src, blocks)
        token = stream.write(pair.p_kv.tensor[1, 0, 7], pair.p_kv.tensor[1, 0, 7])
        pair.initiator.write_layer("d", "r", 1, src, blocks, token)
        pair.initiator.finish("d", "r")
        pair.target.revoke(P_NODE)  # D's side fenced too: what the paused NIC holds cannot land
        pair.fabric.resume()
        pair.initiator.abort_peer("d", "control connection lost")
        stream.run()
        assert pair.initiator.poll("r").is_failed
        assert pair.fabric.wait_idle(10)
        assert torch.equal(pair.d_blocks(blocks), before)
        assert pair.initiator.counters.get("layers_posted") <= 1  # layer 1 was never posted
