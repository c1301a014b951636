"""Issue 4's core promise: a disaggregated cluster gives exactly what a mixed instance gives.

Real processes (redis-server, `splitwise serve` instances), real sockets, the real HTTP API.
Requests go one at a time so both sides run the same batch shapes: greedy outputs (and their
logprobs) must then be identical token for token. Every shape runs twice: coordinated through
one redis-server, and through a real 3-master Redis Cluster (``--scheduler-cluster``; one
cluster for the whole session, a topic per test).
"""

from __future__ import annotations

import random

import pytest

from tests.instance.helpers import complete, start_cluster

BLOCK_SIZE = 4
CHUNK_TOKENS = 32


def prompt_set(n: int = 50, seed: int = 0) -> list[list[int]]:
    """Varied lengths: one token, exactly one block, block multiples, many blocks, longer than a chunk."""
    rng = random.Random(seed)
    lengths = [
        1,
        BLOCK_SIZE,
        2 * BLOCK_SIZE,
        BLOCK_SIZE + 1,
        CHUNK_TOKENS,
        CHUNK_TOKENS + 1,
        3 * CHUNK_TOKENS + 5,
    ]
    lengths += [rng.randint(1, 120) for _ in range(n - len(lengths))]
    return [[rng.randint(3, 1000) for _ in range(k)] for k in lengths]


PROMPTS = prompt_set()


@pytest.fixture(scope="module")
def mixed_outputs(tiny_model: object) -> list[tuple[list[int], list[float]]]:
    cluster = start_cluster(tiny_model, num_prefill=0, num_decode=0, num_mixed=1)  # type: ignore[arg-type]
    try:
        return [_tokens(complete(cluster.entry.base_url, p)) for p in PROMPTS]
    finally:
        cluster.stop()


def _tokens(resp: dict) -> tuple[list[int], list[float]]:
    choice = resp["choices"][0]
    return choice["text"], choice["logprobs"]["token_logprobs"]


def _backend_spec(request: pytest.FixtureRequest, backend: str, name: str) -> dict[str, object]:
    """start_cluster arguments for the Redis deployment: its own redis-server, or the session's
    Redis Cluster under a topic of this test's own."""
    if backend == "redis":
        return {}
    servers = request.getfixturevalue("redis_cluster")
    return {
        "scheduler_host": servers.seed.host,
        "scheduler_port": servers.seed.port,
        "topic": f"eq-{name}",
        "extra": ["--scheduler-cluster"],
    }


@pytest.mark.parametrize("backend", ["redis", "redis-cluster"])
@pytest.mark.parametrize(
    ("num_prefill", "num_decode", "transfer"),
    [(1, 1, "ipc"), (1, 1, "tcp"), (2, 2, "ipc"), (1, 3, "tcp")],
    ids=["1P1D-ipc", "1P1D-tcp", "2P2D-ipc", "1P3D-tcp"],
)
def test_disaggregated_equals_mixed(
    cluster_factory, mixed_outputs, request, backend: str, num_prefill: int, num_decode: int, transfer: str
) -> None:  # type: ignore[no-untyped-def]
    name = f"{num_prefill}p{num_decode}d-{transfer}"
    cluster = cluster_factory(
        num_prefill=num_prefill,
        num_decode=num_decode,
        transfer=transfer,
        **_backend_spec(request, backend, name),
    )
    # Send through every instance's frontend in turn: any instance accepts requests.
    urls = [c.base_url for c in cluster.children]
    got = [_tokens(complete(urls[i % len(urls)], p)) for i, p in enumerate(PROMPTS)]
    mismatches = [i for i, (a, b) in enumerate(zip(got, mixed_outputs, strict=False)) if a[0] != b[0]]
    assert not mismatches, (
        f"{len(mismatches)} prompts differ, first: #{mismatches[0]} len={len(PROMPTS[mismatches[0]])}"
    )
    for (_, got_lp), (_, want_lp) in zip(got, mixed_outputs, strict=False):
        assert got_lp == pytest.approx(want_lp, abs=1e-4)
    # Every request really went through a prefill node and a KV transfer (no silent local prefill).
    for child in cluster.children:
        if child.role == "decode":
            text = child.log_file.read_text()
            assert "prefilling locally" not in text, cluster.log_tail(child)
    assert sum(
        c.log_file.read_text().count("remote prefill landed") for c in cluster.children if c.role == "decode"
    ) == len(PROMPTS)
