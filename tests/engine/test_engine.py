"""LLMEngine end to end on the tiny model: batching, chunking, prefix cache, preemption, abort,
sampling, stop strings, bad input, and the disaggregation API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from splitwise.engine.config import EngineConfig
from splitwise.engine.engine import LLMEngine
from splitwise.engine.errors import InvalidRequestError, ModelLoadError, UnsupportedArchitectureError
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import FinishReason
from splitwise.engine.tiny_model import default_model_dir

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return default_model_dir("tiny")


def make_engine(model_dir: Path, **overrides: object) -> LLMEngine:
    cfg: dict[str, object] = {
        "model": str(model_dir),
        "block_size": 4,
        "num_kv_blocks": 128,
        "max_num_batched_tokens": 64,
    }
    cfg.update(overrides)
    return LLMEngine(EngineConfig(**cfg))  # type: ignore[arg-type]


@pytest.fixture()
def engine(model_dir: Path) -> Iterator[LLMEngine]:
    eng = make_engine(model_dir)
    yield eng
    eng.close()


def prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, 900, (k,), generator=g).tolist() for k in lengths]


def test_batch_equals_alone_and_no_leak(engine: LLMEngine, model_dir: Path) -> None:
    ps = prompts(8)
    batched = engine.generate(ps, GREEDY)
    fresh = make_engine(model_dir, enable_prefix_caching=False)
    alone = [fresh.generate([p], GREEDY)[0].token_ids for p in ps]
    assert [r.token_ids for r in batched] == alone
    assert all(len(r.token_ids) == 10 and r.finish_reason is FinishReason.LENGTH for r in batched)
    assert engine.block_manager.num_referenced_blocks == 0
    assert fresh.block_manager.num_referenced_blocks == 0


def test_chunked_prefill_equals_unchunked(model_dir: Path) -> None:
    ps = prompts(4, seed=1, lo=30, hi=60)
    small = make_engine(model_dir, max_num_batched_tokens=8, enable_prefix_caching=False)
    big = make_engine(model_dir, max_num_batched_tokens=256, enable_prefix_caching=False)
    assert [r.token_ids for r in small.generate(ps, GREEDY)] == [
        r.token_ids for r in big.generate(ps, GREEDY)
    ]
    assert small.stats.num_steps > big.stats.num_steps  # it really was chunked


def test_prefix_cache_hit_gives_same_tokens(engine: LLMEngine) -> None:
    prefix = prompts(1, seed=2, lo=20, hi=21)[0]
    a = prefix + [5, 6, 7]
    first = engine.generate([a], GREEDY)[0]
    second = engine.generate([a], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 20  # 5 full blocks of 4; the last token is always recomputed
    assert second.token_ids == first.token_ids
    assert engine.block_manager.num_referenced_blocks == 0


def test_preemption_by_recompute_keeps_outputs(model_dir: Path) -> None:
    ps = prompts(6, seed=3, lo=10, hi=20)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    tight = make_engine(model_dir, num_kv_blocks=24, enable_prefix_caching=False)
    roomy = make_engine(model_dir, num_kv_blocks=512, enable_prefix_caching=False)
    assert [r.token_ids for r in tight.generate(ps, params)] == [
        r.token_ids for r in roomy.generate(ps, params)
    ]
    assert tight.stats.num_preemptions > 0
    assert tight.block_manager.num_referenced_blocks == 0


def test_request_larger_than_pool_fails_explicitly(model_dir: Path) -> None:
    eng = make_engine(model_dir, num_kv_blocks=4)
    with pytest.raises(InvalidRequestError):
        eng.add_request("big", list(range(3, 40)), GREEDY)  # 37 tokens > 16 slots: refused up front


def test_abort_at_every_stage_frees_blocks(engine: LLMEngine) -> None:
    ps = prompts(3, seed=4, lo=30, hi=40)
    for i, p in enumerate(ps):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    engine.abort("r2")  # still waiting
    engine.step()  # r0, r1 admitted (prefilling)
    engine.abort("r1")
    for _ in range(3):
        engine.step()  # r0 decoding
    engine.abort("r0")
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert {o.req_id for o in outs if o.finish_reason is FinishReason.ABORT} == {"r0"}
    assert engine.block_manager.num_referenced_blocks == 0


def test_seed_reproducible_and_sampling_varies(engine: LLMEngine) -> None:
    p = prompts(1, seed=5)[0]
    a = engine.generate([p], SamplingParams(max_tokens=12, temperature=1.0, seed=42, ignore_eos=True))[0]
    b = engine.generate(
        [p, p[:3]], [SamplingParams(max_tokens=12, temperature=1.0, seed=42, ignore_eos=True)] * 2
    )[0]
    c = engine.generate([p], SamplingParams(max_tokens=12, temperature=1.0, seed=43, ignore_eos=True))[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert all(lp <= 0.0 for lp in a.logprobs)


def test_greedy_logprob_is_max(engine: LLMEngine) -> None:
    out = engine.generate(prompts(1, seed=6), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))[
        0
    ]
    assert len(out.logprobs) == 3 and all(-30.0 < lp <= 0.0 for lp in out.logprobs)


def test_stop_token_ids_and_stop_strings(engine: LLMEngine) -> None:
    p = prompts(1, seed=7)[0]
    full = engine.generate([p], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    stop_id = full.token_ids[4]
    by_id = engine.generate(
        [p], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_id,))
    )[0]
    assert by_id.finish_reason is FinishReason.STOP
    assert by_id.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]
    text = full.text
    stop = next(text[i : i + 3] for i in range(2, len(text) - 3) if "\ufffd" not in text[i : i + 3])
    by_str = engine.generate(
        [p], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, stop=(stop,))
    )[0]
    assert by_str.finish_reason is FinishReason.STOP
    assert by_str.text == text[: text.index(stop)]


def test_eos_stops(engine: LLMEngine) -> None:
    p = prompts(1, seed=8)[0]
    full = engine.generate([p], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    eng_eos = full.token_ids[2]
    engine.stop_checker = type(engine.stop_checker)(
        eos_token_ids={eng_eos}, max_model_len=engine.max_model_len
    )
    engine.scheduler.stop_checker = engine.stop_checker
    out = engine.generate([p], SamplingParams(max_tokens=6, temperature=0.0))[0]
    assert out.finish_reason is FinishReason.STOP and out.token_ids[-1] == eng_eos


def test_bad_input(engine: LLMEngine, model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        engine.add_request("long", [5] * engine.max_model_len, GREEDY)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", [], GREEDY)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.add_request("oov", [10**7], GREEDY)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        LLMEngine(EngineConfig(model=str(bad)))
    with pytest.raises(ModelLoadError, match="config.json"):
        LLMEngine(EngineConfig(model=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="--max-model-len"):
        LLMEngine(EngineConfig(model=str(model_dir), max_model_len=10**9))
    with pytest.raises(ValueError, match="--block-size"):
        EngineConfig(model=str(model_dir), block_size=3)


def test_disaggregated_prefill_then_decode_equals_mixed(model_dir: Path) -> None:
    """P runs prefill only, its KV is copied into D's reserved blocks, D decodes: same tokens."""
    ps = prompts(5, seed=9, lo=1, hi=30)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    mixed = make_engine(model_dir).generate(ps, params)
    p_eng = make_engine(model_dir, num_kv_blocks=64)
    d_eng = make_engine(model_dir, num_kv_blocks=96)
    layers_seen: list[int] = []
    p_eng.set_layer_callback(lambda layer, chunks, ready: layers_seen.append(layer))
    for i, prompt in enumerate(ps):
        p_eng.add_request(f"p{i}", prompt, params, prefill_only=True)
    done = {}
    while p_eng.has_unfinished():
        for out in p_eng.step():
            if out.finished:
                done[out.req_id] = out
    assert all(o.finish_reason is FinishReason.PREFILL_DONE for o in done.values())
    assert set(range(p_eng.model_config.num_layers)) <= set(layers_seen)
    for i, prompt in enumerate(ps):
        out = done[f"p{i}"]
        dst = d_eng.reserve(f"p{i}", len(prompt) + 8)
        src = list(out.block_ids)
        n = -(-len(prompt) // 4)
        for layer in range(p_eng.model_config.num_layers):
            d_eng.kv_cache.tensor[layer, :, dst[:n]] = p_eng.kv_cache.tensor[layer, :, src[:n]]
        p_eng.release_prefill(f"p{i}")
        first = d_eng.add_prefilled_request(
            f"p{i}", prompt, params, out.new_token_ids[0], out.new_logprobs[0]
        )
        assert first.new_token_ids == [mixed[i].token_ids[0]]
    tokens: dict[str, list[int]] = {f"p{i}": [mixed[i].token_ids[0]] for i in range(len(ps))}
    while d_eng.has_unfinished():
        for out in d_eng.step():
            tokens[out.req_id] += out.new_token_ids
    assert [tokens[f"p{i}"] for i in range(len(ps))] == [m.token_ids for m in mixed]
    assert p_eng.block_manager.num_referenced_blocks == 0
    assert d_eng.block_manager.num_referenced_blocks == 0


def test_reservation_release_and_abort(engine: LLMEngine) -> None:
    free = engine.block_manager.num_free_blocks
    ids = engine.reserve("x", 30)
    assert len(ids) == 8 and engine.block_manager.num_free_blocks == free - 8
    engine.abort("x")  # a bare reservation: abort releases it
    assert engine.block_manager.num_free_blocks == free
    engine.reserve("y", 5)
    engine.release_reservation("y")
    assert engine.block_manager.num_referenced_blocks == 0


def test_stale_shared_memory_segments_are_removed(tmp_path: Path) -> None:
    from splitwise.engine.kv_cache import remove_stale_segments

    dead_pid = 2**22 + 12345  # above pid_max on default kernels: never alive
    (tmp_path / f"splitwise-kv-{dead_pid}-abcd").write_bytes(b"x")
    (tmp_path / f"splitwise-kv-{__import__('os').getpid()}-beef").write_bytes(b"x")  # ours: alive
    (tmp_path / "unrelated").write_bytes(b"x")
    removed = remove_stale_segments(shm_dir=str(tmp_path))
    assert removed == [f"splitwise-kv-{dead_pid}-abcd"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"splitwise-kv-{__import__('os').getpid()}-beef", "unrelated"]
    )


def test_detokenize_off_gives_same_tokens_and_still_honours_stop_strings(model_dir: Path) -> None:
    p = prompts(1, seed=10)[0]
    with_text = make_engine(model_dir)
    without = make_engine(model_dir, detokenize=False)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    a, b = with_text.generate([p], params)[0], without.generate([p], params)[0]
    assert a.token_ids == b.token_ids and b.text == "" and a.text
    stop = next(a.text[i : i + 3] for i in range(2, len(a.text) - 3) if "\ufffd" not in a.text[i : i + 3])
    stopped = without.generate(
        [p], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=(stop,))
    )[0]
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.text == a.text[: a.text.index(stop)]
