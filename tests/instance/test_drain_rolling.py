"""A rolling restart of every instance of a 2P2D cluster under continuous streaming load, through
the router: each instance in turn gets SIGTERM (it drains), exits 0 and is started again with the
same flags. Zero failed requests, every output equal to the greedy reference."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from splitwise.cluster import ClusterSpec, LocalCluster
from splitwise.engine.config import EngineConfig
from splitwise.engine.engine import LLMEngine
from splitwise.engine.sampling_params import SamplingParams
from splitwise.testing.rolling import StreamingLoad, rolling_restart
from tests.instance.helpers import ALWAYS_DISAGG, ENGINE_ARGS
from tests.instance.pd_helpers import log_text, make_prompt

MAX_TOKENS = 48


@pytest.fixture()
def big_cluster(tiny_model: Path) -> Iterator[Callable[..., LocalCluster]]:
    """Like conftest's cluster_factory, with a start-up wait for five processes on a loaded machine."""
    started: list[LocalCluster] = []

    def make(*, extra: list[str], **spec: Any) -> LocalCluster:
        cluster = LocalCluster(
            ClusterSpec(
                model=str(tiny_model),
                extra_args=ENGINE_ARGS + extra,
                threads_per_instance=1,
                scheduler_args=ALWAYS_DISAGG,
                **spec,
            )
        )
        started.append(cluster)
        cluster.start()
        cluster.wait_ready(timeout_s=900)
        return cluster

    yield make
    for cluster in started:
        cluster.stop()


def references(model: Path, prompts: list[list[int]]) -> list[str]:
    engine = LLMEngine(
        EngineConfig(model=str(model), block_size=4, max_num_batched_tokens=32, num_kv_blocks=512)
    )
    try:
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        return [r.text for r in engine.generate(prompts, params)]
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_rolling_restart_of_a_2p2d_cluster_under_load_fails_nothing(
    big_cluster: Callable[..., LocalCluster], tiny_model: Path
) -> None:  # type: ignore[no-untyped-def]
    cluster = big_cluster(
        num_prefill=2, num_decode=2, router=True, transfer="ipc", extra=["--drain-grace-period", "120"]
    )
    prompts = [make_prompt(24 + 4 * i, seed=100 + i) for i in range(6)]
    want = references(tiny_model, prompts)
    load = StreamingLoad(cluster.entry.base_url, prompts, want, max_tokens=MAX_TOKENS, num_clients=3).start()
    try:
        records = rolling_restart(cluster, load)
    finally:
        counts = load.stop()
    assert [r.name for r in records] == ["decode-0", "decode-1", "prefill-0", "prefill-1"]
    assert counts.failed == 0 and counts.mismatched == 0, counts.errors
    assert counts.ok >= 8, counts  # load ran through the restarts
    for child in cluster.children:
        if child.role != "router":
            assert child.num_restarts == 1 and child.process.poll() is None
    # Each drained instance logged its drain (the first run's log) and exited 0 (restart checks it).
    for log in sorted(cluster.log_dir.glob("*-?.log")):
        if not log.name.startswith("router"):
            assert "drain done" in log.read_text(errors="replace"), log.name
    assert all("instance ready" in log_text(c) for c in cluster.children if c.role != "router")
