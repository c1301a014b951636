"""ipc's block copy: every (src, dst) pair lands, whatever mix of runs and scattered blocks."""

from __future__ import annotations

import pytest
import torch

from splitwise.transfer.base import coalesce_runs
from splitwise.transfer.ipc import SHORT_RUN_BLOCKS, copy_runs

CASES = {
    "src consecutive, dst scattered": (
        [*range(3, 26)],
        [60, 2, 17, 33, 5, 48, 0, 11, 29, 64, 7, 40, 21, 55, 13, 36, 9, 44, 26, 69, 1, 50, 31],
    ),
    "src scattered, dst consecutive": ([41, 2, 17, 33, 5, 48, 0, 11, 29, 9, 7], [*range(5, 16)]),
    "both scattered": ([41, 2, 17, 33, 5, 48, 0], [3, 66, 12, 40, 8, 19, 27]),
    "short runs mixed": ([1, 2, 3, 10, 11, 12, 13, 20, 40, 41], [60, 61, 62, 0, 1, 2, 3, 9, 33, 34]),
    "long runs": ([*range(0, 20), *range(30, 46)], [*range(40, 60), *range(0, 16)]),
    # > 64 runs of consecutive sources: the gather + scatter fallback.
    "many source runs": ([*range(198, 0, -2)], [*range(120, 219)]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_block_lands_and_nothing_else_is_touched(case: str, dtype: torch.dtype) -> None:
    src, dst = CASES[case]
    local = torch.randn(2, 200, 4, 3).to(dtype)
    remote = torch.full((2, 220, 4, 3), -7.0, dtype=dtype)
    runs = coalesce_runs(src, dst)
    if case == "long runs":
        assert len(runs) * SHORT_RUN_BLOCKS <= len(src)  # the per-run copy_ path
    else:
        assert len(runs) * SHORT_RUN_BLOCKS > len(src)  # the vectorised path

    copy_runs(remote, local, runs)

    for s, d in zip(src, dst, strict=True):
        assert torch.equal(remote[:, d], local[:, s])
    untouched = sorted(set(range(220)) - set(dst))
    assert (remote[:, untouched] == -7.0).all()
