"""Our paged forward pass against Hugging Face transformers, for every supported family.

Each case builds a tiny random HF model (fixed seed), saves it as safetensors, loads it with our
loader and compares logits: every prefill position, then decode one token at a time through the
paged cache. Block ids are shuffled and non-contiguous on purpose.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from splitwise.engine.config import EngineConfig, ModelConfig
from splitwise.engine.kv_cache import KVCache
from splitwise.engine.model_runner import ModelRunner, ScheduledChunk, build_kv_cache
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import Sequence

ATOL = 1e-4
BLOCK_SIZE = 4
VOCAB = 128
TINY: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    head_dim=16,
    max_position_embeddings=256,
)
# rope_theta 500 with original_max_position_embeddings 16 puts the 8 frequencies in all three
# llama3 regions (kept / blended / divided by factor), so the test exercises each branch.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 500.0,
}

CASES: dict[str, Callable[[], transformers.PreTrainedConfig]] = {
    "llama3-rope": lambda: transformers.LlamaConfig(**TINY, rope_parameters=LLAMA3_ROPE),
    "llama-tied-linear-rope-bias": lambda: transformers.LlamaConfig(
        **TINY,
        tie_word_embeddings=True,
        attention_bias=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    ),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=None),
    # Window 6 < the 19-token prompt and the 14 decode steps: the window is exercised both ways.
    "mistral-sliding-window": lambda: transformers.MistralConfig(**TINY, sliding_window=6),
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
    "qwen3": lambda: transformers.Qwen3Config(**TINY),
}


def save_hf_model(config: transformers.PreTrainedConfig, path: Path, **save_kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    # Norm weights start at 1 in HF; randomise them so a wrong norm cannot hide.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    return model


def hf_logits(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def make_runner(model_dir: Path, num_blocks: int = 32) -> tuple[ModelRunner, KVCache]:
    model_config = ModelConfig.from_dir(model_dir)
    # float32 explicitly: this is the fp32 parity test, whatever the engine default becomes.
    engine_config = EngineConfig(
        model=str(model_dir), dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=num_blocks
    )
    kv_cache = build_kv_cache(model_config, engine_config)
    return ModelRunner(model_config, engine_config, kv_cache), kv_cache


def make_seq(token_ids: list[int], block_table: list[int], num_computed_tokens: int = 0) -> Sequence:
    return Sequence(
        req_id="r",
        prompt_token_ids=list(token_ids),
        params=SamplingParams(),
        block_table=list(block_table),
        num_computed_tokens=num_computed_tokens,
    )


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    path = tmp_path_factory.mktemp(request.param)
    return path, save_hf_model(CASES[request.param](), path)


def test_prefill_logits_match_hf_at_every_position(checkpoint: tuple[Path, Any]) -> None:
    path, hf_model = checkpoint
    runner, _ = make_runner(path)
    tokens = torch.randint(0, VOCAB, (19,), generator=torch.Generator().manual_seed(1)).tolist()
    seq = make_seq(tokens, block_table=[7, 2, 11, 0, 5])

    ours = runner.forward([ScheduledChunk(seq, len(tokens))], all_tokens=True)

    expected = hf_logits(hf_model, tokens)
    assert ours.dtype == torch.float32
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < ATOL


def test_step_by_step_decode_matches_hf(checkpoint: tuple[Path, Any]) -> None:
    path, hf_model = checkpoint
    runner, _ = make_runner(path)
    tokens = torch.randint(0, VOCAB, (14,), generator=torch.Generator().manual_seed(2)).tolist()
    expected = hf_logits(hf_model, tokens)
    seq = make_seq(tokens, block_table=[9, 3, 14, 1])
    num_prompt = 3

    logits = runner.execute([ScheduledChunk(seq, num_prompt)])
    diffs = [(logits[0] - expected[num_prompt - 1]).abs().max().item()]
    seq.num_computed_tokens = num_prompt  # the test plays the engine: advance after each step
    for pos in range(num_prompt, len(tokens)):
        logits = runner.execute([ScheduledChunk(seq, 1)])
        diffs.append((logits[0] - expected[pos]).abs().max().item())
        seq.num_computed_tokens = pos + 1

    assert len(diffs) == len(tokens) - num_prompt + 1
    assert max(diffs) < ATOL, diffs


def test_sharded_checkpoint_loads_and_matches_hf(tmp_path: Path) -> None:
    hf_model = save_hf_model(CASES["qwen3"](), tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    runner, _ = make_runner(tmp_path)
    tokens = [5, 17, 99, 3, 64, 21, 8]

    ours = runner.forward([ScheduledChunk(make_seq(tokens, [4, 1]), len(tokens))], all_tokens=True)

    assert (ours - hf_logits(hf_model, tokens)).abs().max().item() < ATOL


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_close_to_float32(tmp_path: Path, dtype: str) -> None:
    hf_model = save_hf_model(CASES["llama3-rope"](), tmp_path)
    model_config = ModelConfig.from_dir(tmp_path)
    engine_config = EngineConfig(model=str(tmp_path), dtype=dtype, block_size=BLOCK_SIZE, num_kv_blocks=8)
    kv_cache = build_kv_cache(model_config, engine_config)
    runner = ModelRunner(model_config, engine_config, kv_cache)
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]

    ours = runner.forward([ScheduledChunk(make_seq(tokens, [6, 2, 4]), len(tokens))], all_tokens=True)

    assert kv_cache.tensor.dtype == engine_config.torch_dtype
    assert next(runner.model.parameters()).dtype == engine_config.torch_dtype
    assert ours.dtype == torch.float32
    # Half precision keeps ~3 significant digits; the tiny model's logits are O(0.1-1).
    assert (ours - hf_logits(hf_model, tokens)).abs().max().item() < 5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_matches_hf(tmp_path: Path, dtype: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU available")
    hf_model = save_hf_model(CASES["qwen3"](), tmp_path)
    model_config = ModelConfig.from_dir(tmp_path)
    engine_config = EngineConfig(
        model=str(tmp_path), dtype=dtype, device="cuda", block_size=BLOCK_SIZE, num_kv_blocks=16
    )
    runner = ModelRunner(model_config, engine_config, build_kv_cache(model_config, engine_config))
    tokens = torch.randint(0, VOCAB, (11,), generator=torch.Generator().manual_seed(3)).tolist()
    seq = make_seq(tokens, block_table=[9, 2, 14])

    prefill = runner.forward([ScheduledChunk(seq, 8)], all_tokens=True)
    seq.num_computed_tokens = 8
    rest = runner.forward([ScheduledChunk(seq, 3)], all_tokens=True)

    assert prefill.device.type == "cuda"
    tolerance = ATOL * 10 if dtype == "float32" else 5e-2  # TF32/bf16 kernels round differently
    assert (torch.cat([prefill, rest]).cpu() - hf_logits(hf_model, tokens)).abs().max().item() < tolerance
