"""Prefill and decode instances of different tensor-parallel sizes give what a mixed TP=1
instance gives, token for token: real `splitwise serve` processes with their rank processes,
real gloo, real Redis, the HTTP API; ipc and tcp; chunked prefill (prompts longer than the
32-token step) and prefix caching (the second prompt reuses the first's 16-token prefix).

tiny-mqa has 1 KV head: at TP=2 each rank keeps a replica, so (1,2) and (2,1) remap heads;
tiny-mha has 4: TP=2 splits them and the buffers match byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from splitwise.engine.tiny_model import default_model_dir
from tests.instance.helpers import complete, start_cluster

pytestmark = pytest.mark.slow

PROMPTS = [list(range(10, 50)), list(range(10, 26)) + [700, 701, 702, 9], [321, 5, 77]]


def outputs(base_url: str) -> list[tuple[str, list[float]]]:
    got = []
    for prompt in PROMPTS:
        choice = complete(base_url, prompt, max_tokens=8)["choices"][0]
        got.append((choice["text"], choice["logprobs"]["token_logprobs"]))
    return got


def assert_same(got: list[tuple[str, list[float]]], want: list[tuple[str, list[float]]]) -> None:
    assert [text for text, _ in got] == [text for text, _ in want]
    for (_, got_lp), (_, want_lp) in zip(got, want, strict=True):
        assert got_lp == pytest.approx(want_lp, abs=1e-4)


@pytest.fixture(scope="module")
def references() -> Iterator[dict[str, list[tuple[str, list[float]]]]]:
    """Mixed TP=1 outputs per model, computed on first use."""
    cache: dict[str, list[tuple[str, list[float]]]] = {}

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, size: str) -> list[tuple[str, list[float]]]:
            cluster = start_cluster(model(size), num_prefill=0, num_decode=0, num_mixed=1)
            try:
                self[size] = outputs(cluster.entry.base_url)
            finally:
                cluster.stop()
            return self[size]

    yield Lazy(cache)


def model(size: str) -> Path:
    return default_model_dir(size)


def test_mixed_tp2_instance_equals_tp1(references) -> None:  # type: ignore[no-untyped-def]
    cluster = start_cluster(model("tiny-mqa"), num_prefill=0, num_decode=0, num_mixed=1, decode_tp=2)
    try:
        assert_same(outputs(cluster.entry.base_url), references["tiny-mqa"])
    finally:
        cluster.stop()


@pytest.mark.parametrize(
    ("size", "p_tp", "d_tp", "transfer"),
    [
        ("tiny-mqa", 1, 2, "ipc"),
        ("tiny-mqa", 2, 1, "ipc"),
        ("tiny-mqa", 2, 2, "ipc"),
        ("tiny-mqa", 1, 2, "tcp"),
        ("tiny-mqa", 2, 1, "tcp"),
        ("tiny-mqa", 2, 2, "tcp"),
        ("tiny-mha", 2, 1, "ipc"),
        ("tiny-mha", 1, 2, "tcp"),
    ],
)
def test_pd_with_different_tp_equals_mixed_tp1(
    references, size: str, p_tp: int, d_tp: int, transfer: str
) -> None:  # type: ignore[no-untyped-def]
    want = references[size]
    cluster = start_cluster(model(size), transfer=transfer, prefill_tp=p_tp, decode_tp=d_tp)
    try:
        assert_same(outputs(cluster.entry.base_url), want)
        decode = next(c for c in cluster.children if c.role == "decode")
        text = decode.log_file.read_text()
        assert "prefilling locally" not in text, cluster.log_tail(decode)
        assert text.count("remote prefill landed") == len(PROMPTS), cluster.log_tail(decode)
    finally:
        cluster.stop()
