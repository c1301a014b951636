"""Rank 1 of test_tp_group: receives broadcasts and checks them (``python -m tests.tp.group_peer PORT``)."""

from __future__ import annotations

import os
import sys

import torch

from splitwise.engine.parallel.group import RankGroup
from tests.tp.test_tp_group import LENGTHS, payload


def main() -> None:
    group = RankGroup(
        rank=1,
        world_size=2,
        store_host="127.0.0.1",
        store_port=int(sys.argv[1]),
        device=torch.device("cpu"),
        compute_timeout_s=60,
    )
    for n in LENGTHS:
        if group.broadcast_bytes(None) != payload(n):
            print(f"length {n}: wrong bytes", flush=True)
            os._exit(1)
    summed = group.all_reduce(torch.full((3,), 2.0))
    gathered = group.all_gather(torch.full((2,), 1.0))
    sys.exit(
        0
        if summed.tolist() == [3.0] * 3 and [t.tolist() for t in gathered] == [[0.0, 0.0], [1.0, 1.0]]
        else 1
    )


if __name__ == "__main__":
    main()
