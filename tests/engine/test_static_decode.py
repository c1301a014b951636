"""The fixed-shape decode step (CUDA graphs replay it on GPU) against the dynamic path, on CPU
without capture: same logits, same cache bytes, nothing written outside the batch's blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from splitwise.engine.config import EngineConfig, ModelConfig
from splitwise.engine.model_runner import ModelRunner, ScheduledChunk, build_kv_cache
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import Sequence
from splitwise.engine.static_decode import (
    BATCH_BUCKETS,
    DecodeInput,
    StaticDecodeStep,
    blocks_bucket,
    bucket_of,
)

BLOCK_SIZE = 4
NUM_BLOCKS = 40
VOCAB = 96


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)
    return path


def make_runner(model_dir: Path) -> ModelRunner:
    model_config = ModelConfig.from_dir(model_dir)
    engine_config = EngineConfig(model=str(model_dir), block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS)
    return ModelRunner(model_config, engine_config, build_kv_cache(model_config, engine_config))


def test_buckets() -> None:
    assert [bucket_of(n, BATCH_BUCKETS) for n in (1, 2, 3, 5, 8, 9, 33)] == [1, 2, 4, 8, 8, 16, 64]
    assert [blocks_bucket(n) for n in (1, 2, 3, 4, 5, 17)] == [1, 2, 4, 4, 8, 32]


def test_can_run_only_plain_decode_steps() -> None:
    assert StaticDecodeStep.can_run([1, 1, 1], has_callback=False, sliding_window=None)
    assert not StaticDecodeStep.can_run([1, 3], has_callback=False, sliding_window=None)
    assert not StaticDecodeStep.can_run([1], has_callback=True, sliding_window=None)
    assert not StaticDecodeStep.can_run([1], has_callback=False, sliding_window=8)
    assert not StaticDecodeStep.can_run(
        [1] * (BATCH_BUCKETS[-1] + 1), has_callback=False, sliding_window=None
    )


def test_padded_step_matches_the_dynamic_path(model_dir: Path) -> None:
    runner = make_runner(model_dir)
    g = torch.Generator().manual_seed(5)
    lengths = [5, 11, 2]  # 3 sequences -> batch bucket 4 (one padding row); 3 blocks -> bucket 4
    tables = [[17, 3, 9], [30, 1, 22, 8], [6]]
    seqs = []
    for i, (n, table) in enumerate(zip(lengths, tables, strict=True)):
        tokens = torch.randint(0, VOCAB, (n + 1,), generator=g).tolist()
        seq = Sequence(req_id=f"r{i}", prompt_token_ids=tokens, params=SamplingParams(), block_table=table)
        runner.execute([ScheduledChunk(seq, n)])  # prefill all but the last token
        seq.num_computed_tokens = n
        seqs.append(seq)
    before = runner.kv_cache.tensor.clone()

    dynamic = runner.execute([ScheduledChunk(s, 1) for s in seqs])
    after_dynamic = runner.kv_cache.tensor.clone()
    runner.kv_cache.tensor.copy_(before)
    step = StaticDecodeStep(runner.model, runner.kv_cache, BLOCK_SIZE, use_graphs=False)
    inputs = [DecodeInput(s.prompt_token_ids[-1], s.num_computed_tokens, s.block_table) for s in seqs]
    static = step.run(inputs)

    assert static.shape == dynamic.shape
    assert (static - dynamic).abs().max().item() < 1e-5
    # Same K/V written, and nothing outside the three sequences' own slots.
    assert (runner.kv_cache.tensor - after_dynamic).abs().max().item() < 1e-6
    used = sorted({b for t in tables for b in t})
    untouched = [b for b in range(NUM_BLOCKS) if b not in used]
    assert torch.equal(runner.kv_cache.tensor[:, :, untouched], before[:, :, untouched])


@pytest.mark.gpu
def test_cuda_graph_replay_matches_the_dynamic_path(model_dir: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU available")
    model_config = ModelConfig.from_dir(model_dir)
    engine_config = EngineConfig(
        model=str(model_dir),
        device="cuda",
        block_size=BLOCK_SIZE,
        num_kv_blocks=NUM_BLOCKS,
        cuda_graphs=False,
    )
    runner = ModelRunner(model_config, engine_config, build_kv_cache(model_config, engine_config))
    tokens = list(range(3, 12))
    seq = Sequence(req_id="r", prompt_token_ids=tokens, params=SamplingParams(), block_table=[4, 9, 2])
    runner.execute([ScheduledChunk(seq, 8)])
    seq.num_computed_tokens = 8
    before = runner.kv_cache.tensor.clone()
    dynamic = runner.execute([ScheduledChunk(seq, 1)])
    runner.kv_cache.tensor.copy_(before)
    step = StaticDecodeStep(runner.model, runner.kv_cache, BLOCK_SIZE, use_graphs=True)
    first = step.run([DecodeInput(tokens[-1], 8, seq.block_table)])  # captures
    runner.kv_cache.tensor.copy_(before)
    replayed = step.run([DecodeInput(tokens[-1], 8, seq.block_table)])  # replays
    assert (first - dynamic).abs().max().item() < 1e-3
    assert (replayed - dynamic).abs().max().item() < 1e-3
