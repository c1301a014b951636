"""Logits processing (penalties, logit_bias, min_p, min_tokens, allowed tokens), top logprobs and
structured outputs: exact expectations on small tensors, then through the engine (mixed and an
in-process prefill -> decode hand-off, which must give the same tokens)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from splitwise.engine.config import EngineConfig
from splitwise.engine.engine import LLMEngine
from splitwise.engine.errors import InvalidRequestError
from splitwise.engine.logits_processing import RowHistory, process_logits, token_counts
from splitwise.engine.sampler import Sampler
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import FinishReason
from splitwise.engine.tiny_model import default_model_dir

VOCAB = 8
NO_STOPS: frozenset[int] = frozenset()


def test_token_counts_flattened() -> None:
    counts = token_counts([0, 2], [[1, 1, 3], [7]], (3, VOCAB), torch.device("cpu"))
    assert counts[0].tolist() == [0, 2, 0, 1, 0, 0, 0, 0]
    assert counts[1].sum() == 0 and counts[2, 7] == 1


def test_penalties_exact() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0]] * 2)
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),  # untouched in the same batch
    ]
    history = RowHistory(prompt_token_ids=[1], output_token_ids=[0, 0, 2])
    out = process_logits(logits, params, [history, history], stop_token_ids=NO_STOPS)
    # token 0: 2/2 - 0.5*2 - 0.25 ; token 1 (prompt only): -2*2 ; token 2: 1/2 - 0.5 - 0.25
    assert out[0, :4].tolist() == pytest.approx([-0.25, -4.0, -0.25, 0.5])
    assert torch.equal(out[1], logits[1])


def test_logit_bias_min_tokens_allowed_ids() -> None:
    logits = torch.zeros(3, VOCAB)
    params = [
        SamplingParams(logit_bias=((5, 100.0), (6, -100.0))),
        SamplingParams(min_tokens=2, stop_token_ids=(3,), max_tokens=4),
        SamplingParams(allowed_token_ids=(1, 4)),
    ]
    histories = [RowHistory([], []), RowHistory([], [7]), RowHistory([], [])]
    out = process_logits(logits, params, histories, stop_token_ids=frozenset({2}))
    assert out[0, 5] == 100.0 and out[0, 6] == -100.0
    assert torch.isinf(out[1, 2]) and torch.isinf(out[1, 3]) and out[1, 0] == 0
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [1, 4]
    greedy = Sampler().sample(logits[:1], [SamplingParams(temperature=0.0, logit_bias=((5, 100.0),))], [0])
    assert greedy.token_ids == [5]


def test_min_tokens_never_leaves_a_row_empty() -> None:
    allowed = torch.zeros(1, VOCAB, dtype=torch.bool)
    allowed[0, 2] = True  # a finished grammar: only eos
    params = [SamplingParams(min_tokens=3, max_tokens=5, temperature=0.0)]
    out = Sampler(stop_token_ids=frozenset({2})).sample(
        torch.zeros(1, VOCAB), params, [0], histories=[RowHistory([], [])], allowed=allowed
    )
    assert out.token_ids == [2]


def test_min_p_keeps_only_likely_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0]]) + 1e-12).repeat(300, 1)
    out = Sampler(seed=3).sample(logits, [SamplingParams(min_p=0.5)] * 300, [0] * 300)
    assert set(out.token_ids) == {0, 1}


def test_top_logprobs_are_the_raw_top_k() -> None:
    logits = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    out = Sampler().sample(logits, [SamplingParams(top_logprobs=3), SamplingParams()], [0, 0])
    raw = torch.log_softmax(logits, dim=-1)
    values, ids = raw[0].topk(3)
    assert [t for t, _ in out.top_logprobs[0]] == ids.tolist()
    assert [lp for _, lp in out.top_logprobs[0]] == pytest.approx(values.tolist())
    assert out.top_logprobs[1] == []


def test_params_validation() -> None:
    # The wire round trip is the codec's (tests/scheduler/test_messages.py, tests/transfer).
    assert SamplingParams(stop=["a"], logit_bias=[[3, 1.5]]) == SamplingParams(
        stop=("a",), logit_bias=((3, 1.5),)
    )
    with pytest.raises(InvalidRequestError, match="presence_penalty"):
        SamplingParams(presence_penalty=3.0)
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(min_tokens=20, max_tokens=5)


# -- through the engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return default_model_dir("tiny")


def make_engine(model_dir: Path) -> LLMEngine:
    return LLMEngine(
        EngineConfig(model=str(model_dir), block_size=4, num_kv_blocks=128, max_num_batched_tokens=64)
    )


SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
        "tag": {"enum": ["red", "green"]},
    },
    "required": ["ok", "n", "tag"],
    "additionalProperties": False,
}
FEATURES = [
    SamplingParams(
        max_tokens=12, temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.7, top_logprobs=3
    ),
    SamplingParams(max_tokens=12, temperature=0.9, seed=7, presence_penalty=1.0, min_p=0.05, min_tokens=5),
    SamplingParams(
        max_tokens=40, temperature=0.8, seed=11, structured_kind="json", structured_spec=json.dumps(SCHEMA)
    ),
]


def _run_mixed(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    return engine.generate([prompt], params)[0].token_ids


def test_structured_json_output_parses(model_dir: Path) -> None:
    engine = make_engine(model_dir)
    try:
        for seed in range(3):
            params = SamplingParams(
                max_tokens=40,
                temperature=1.0,
                seed=seed,
                structured_kind="json",
                structured_spec=json.dumps(SCHEMA),
            )
            result = engine.generate([[5, 6, 7, 8]], params)[0]
            assert result.finish_reason is FinishReason.STOP, result
            value = json.loads(engine.tokenizer.decode(result.token_ids))
            assert set(value) == {"ok", "n", "tag"} and value["tag"] in ("red", "green")
        with pytest.raises(InvalidRequestError, match="json does not compile"):
            engine.add_request("bad", [1, 2], SamplingParams(structured_kind="json", structured_spec="{nope"))
        assert not engine.has_unfinished()
    finally:
        engine.close()


@pytest.mark.parametrize("params", FEATURES, ids=["penalties+top", "seeded+min_tokens", "json"])
def test_prefill_then_decode_equals_mixed(model_dir: Path, params: SamplingParams) -> None:
    """The first token sampled on P (penalties, seeds, grammar) and the rest on D == one engine."""
    prompt = [9, 10, 11, 12, 13, 14, 9, 10]
    mixed_engine = make_engine(model_dir)
    p_eng, d_eng = make_engine(model_dir), make_engine(model_dir)
    try:
        want = mixed_engine.generate([prompt], params)[0]
        p_eng.add_request("r", prompt, params, prefill_only=True)
        done = None
        while p_eng.has_unfinished():
            for out in p_eng.step():
                if out.finished:
                    done = out
        assert done is not None and done.finish_reason is FinishReason.PREFILL_DONE
        dst = d_eng.reserve("r", len(prompt) + params.max_tokens)
        n = -(-len(prompt) // 4)
        for layer in range(p_eng.model_config.num_layers):
            d_eng.kv_cache.tensor[layer, :, dst[:n]] = p_eng.kv_cache.tensor[
                layer, :, list(done.block_ids)[:n]
            ]
        p_eng.release_prefill("r")
        first = d_eng.add_prefilled_request(
            "r", prompt, params, done.new_token_ids[0], done.new_logprobs[0], done.new_top_logprobs[0]
        )
        tokens, tops = list(first.new_token_ids), list(first.new_top_logprobs)
        while d_eng.has_unfinished():
            for out in d_eng.step():
                tokens += out.new_token_ids
                tops += out.new_top_logprobs
        assert tokens == want.token_ids
        assert len(tops) == len(tokens) and all(len(t) == params.top_logprobs for t in tops)
    finally:
        for eng in (mixed_engine, p_eng, d_eng):
            eng.close()


def test_prompt_logprobs_chunked_and_bypassing_the_prefix_cache(model_dir: Path) -> None:
    """Prompt logprobs over several prefill chunks equal log_softmax of one whole-prompt forward;
    a cached prefix does not hide any position."""
    prompt = list(range(20, 60))  # 40 tokens: 3 chunks of <= 16
    engine = LLMEngine(
        EngineConfig(model=str(model_dir), block_size=4, num_kv_blocks=128, max_num_batched_tokens=16)
    )
    try:
        engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))  # fills the prefix cache
        engine.add_request("p", prompt, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2))
        first = None
        while engine.has_unfinished():
            for out in engine.step():
                if out.prompt_logprobs is not None:
                    first = out
        assert first is not None and first.prompt_logprobs is not None
        assert first.num_cached_tokens == 0
        reference = make_engine(model_dir)
        try:
            from splitwise.engine.model_runner import ScheduledChunk
            from splitwise.engine.sequence import Sequence

            seq = Sequence(req_id="ref", prompt_token_ids=prompt, params=SamplingParams())
            reference.block_manager.allocate(seq, len(prompt))
            logits = reference.runner.forward(
                [ScheduledChunk(seq=seq, num_new_tokens=len(prompt))], all_tokens=True
            )
            want = torch.log_softmax(logits.float(), dim=-1)
            reference.block_manager.free(seq)
        finally:
            reference.close()
        got = first.prompt_logprobs
        assert len(got) == len(prompt) - 1
        for i, (logprob, top) in enumerate(got):
            assert logprob == pytest.approx(want[i, prompt[i + 1]].item(), abs=1e-4)
            assert [t for t, _ in top] == want[i].topk(2).indices.tolist()
    finally:
        engine.close()
