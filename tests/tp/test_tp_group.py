"""The rank group's collectives between two real processes over gloo, including step plans
around the one-frame boundary of ``broadcast_bytes``."""

from __future__ import annotations

import subprocess
import sys

import torch

from splitwise.engine.parallel.group import FIRST_FRAME_BYTES, RankGroup

LENGTHS = (0, 1, 100, FIRST_FRAME_BYTES - 9, FIRST_FRAME_BYTES - 8, FIRST_FRAME_BYTES - 7, 100_000)


def payload(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


def test_broadcast_all_reduce_all_gather() -> None:
    store = RankGroup.master_store(2, 60)
    peer = subprocess.Popen([sys.executable, "-m", "tests.tp.group_peer", str(store.port)])
    try:
        group = RankGroup(
            rank=0,
            world_size=2,
            store_host="127.0.0.1",
            store_port=int(store.port),
            device=torch.device("cpu"),
            compute_timeout_s=60,
            store=store,
        )
        for n in LENGTHS:
            assert group.broadcast_bytes(payload(n)) == payload(n)
        assert group.all_reduce(torch.full((3,), 1.0)).tolist() == [3.0] * 3
        assert [t.tolist() for t in group.all_gather(torch.full((2,), 0.0))] == [[0.0, 0.0], [1.0, 1.0]]
        assert peer.wait(timeout=60) == 0
    finally:
        peer.kill()
        peer.wait()
