"""Decode-side prefix reuse on real 1P1D clusters, over ipc and tcp: the greedy text is token for
token a mixed engine's, while D reserves only what its prefix cache lacks and P ships only that.

Block size 4 and a 32-token step (tests/instance/helpers.ENGINE_ARGS), so every second turn is
prefilled in chunks on P. ``--disagg-min-prefill-tokens 16``: a short first turn is prefilled on D
alone (P never sees it), which makes P recompute the prefix the second turn reuses on D.

  case      first turn          second turn                     D reuses   P's prefix
  edge      40 tokens (P+D)     first 40 + 40 new               10 blocks  its cache
  mid       42 tokens (P+D)     first 42 + 20 new (mid-block)   10 blocks  its cache
  recompute 12 tokens (D only)  all 12 + 30 new                  3 blocks  recomputed
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from splitwise.engine.config import EngineConfig
from splitwise.engine.engine import LLMEngine
from splitwise.engine.sampling_params import SamplingParams
from tests.instance.helpers import complete
from tests.instance.pd_helpers import make_prompt, metric, transfer_event

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Iterator[LLMEngine]:
    engine = LLMEngine(
        EngineConfig(model=str(tiny_model), block_size=4, max_num_batched_tokens=32, num_kv_blocks=512)
    )
    yield engine
    engine.close()


def greedy(engine: LLMEngine, prompt: list[int]) -> str:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    [result] = engine.generate([prompt], params)
    return result.text


@pytest.mark.parametrize("transfer", ["ipc", "tcp"])
def test_second_turns_reuse_decode_cache_and_equal_a_mixed_engine(
    cluster_factory, reference, transfer: str
) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(
        num_prefill=1, num_decode=1, transfer=transfer, scheduler_args=["--disagg-min-prefill-tokens", "16"]
    )
    [p] = [c for c in cluster.children if c.role == "prefill"]
    [d] = [c for c in cluster.children if c.role == "decode"]
    edge, mid, short = make_prompt(40, seed=21), make_prompt(42, seed=22), make_prompt(12, seed=23)
    turns = [
        edge,
        edge + make_prompt(40, seed=31),
        mid,
        mid + make_prompt(20, seed=32),
        short,
        short + make_prompt(30, seed=33),
    ]
    bytes_in = []
    for prompt in turns:
        resp = complete(d.base_url, prompt, max_tokens=MAX_TOKENS, timeout=120.0)
        assert resp["choices"][0]["text"] == greedy(reference, prompt)
        bytes_in.append(
            metric(
                d,
                "splitwise_kv_transfer_bytes_total",
                direction="in",
                model_name=_model(cluster),
                protocol=transfer,
            )
        )

    assert transfer_event(d, "prefix_blocks_reused") == 10 + 10 + 3
    assert transfer_event(p, "prefills_shipped") == 5  # all but the short first turn
    assert transfer_event(d, "fallbacks") == 0
    # KV bytes in per turn: the second turns brought only their new blocks.
    per_turn = [b - a for a, b in zip([0.0, *bytes_in], bytes_in, strict=False)]
    block_bytes = per_turn[0] / 10  # the first turn: 10 blocks
    assert per_turn[1] == block_bytes * 10  # 80 tokens = 20 blocks, 10 reused
    assert per_turn[3] == block_bytes * 6  # 62 tokens = 16 blocks, 10 reused
    assert per_turn[4] == 0  # prefilled on D
    assert per_turn[5] == block_bytes * 8  # 42 tokens = 11 blocks, 3 reused


def _model(cluster) -> str:  # type: ignore[no-untyped-def]
    return Path(str(cluster.spec.model)).name
