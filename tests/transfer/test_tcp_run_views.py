from __future__ import annotations

import numpy as np

from splitwise.kv_geometry import KVGeometry
from splitwise.transfer.tcp import _run_views

GEOMETRY = KVGeometry(dtype="float16", block_size=2, num_layers=2, num_kv_heads=1, head_dim=4, num_blocks=10)


def test_adjacent_runs_become_one_view_with_the_same_bytes() -> None:
    data = np.arange(GEOMETRY.total_bytes, dtype=np.uint64).astype(np.uint8)
    buffer = memoryview(data)
    runs = [[2, 1], [3, 2], [7, 1], [0, 1]]  # 2..4 are one range; 7 and 0 stand alone
    views = _run_views(buffer, GEOMETRY, 1, runs)

    assert len(views) == 6  # (2..4, 7, 0) for K, then for V
    block = GEOMETRY.bytes_per_block
    expected = b"".join(
        bytes(data[GEOMETRY.region_offset(1, kind) + (start + i) * block :][:block])
        for kind in (0, 1)
        for start, n in runs
        for i in range(n)
    )
    assert b"".join(bytes(v) for v in views) == expected
