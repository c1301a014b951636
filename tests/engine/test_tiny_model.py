"""make_tiny_model / default_model_dir / the make-tiny-model command, checked against transformers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file

from splitwise.engine.config import ModelConfig
from splitwise.engine.tiny_model import (
    FORMAT_VERSION,
    SIZES,
    count_parameters,
    default_model_dir,
    make_tiny_model,
)

ARCHS = ("llama", "qwen2", "qwen3")
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
# Exact counts pin the shapes: a changed dimension or a missing/extra tensor changes them.
TINY_PARAMS = {"llama": 205_120, "qwen2": 205_376, "qwen3": 139_648}


def file_hashes(model_dir: Path) -> dict[str, str]:
    return {name: hashlib.sha256((model_dir / name).read_bytes()).hexdigest() for name in MODEL_FILES}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch, "tiny", seed=0) for arch in ARCHS}


def test_writes_the_hf_files(tiny_dirs: dict[str, Path]) -> None:
    for model_dir in tiny_dirs.values():
        assert sorted(p.name for p in model_dir.iterdir()) == sorted(MODEL_FILES)


def test_same_arguments_give_byte_identical_files(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    again = make_tiny_model(tmp_path / "again", "llama", "tiny", seed=0)
    assert file_hashes(again) == file_hashes(tiny_dirs["llama"])


def test_seed_changes_weights_but_not_tokenizer(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    other = file_hashes(make_tiny_model(tmp_path / "s1", "llama", "tiny", seed=1))
    base = file_hashes(tiny_dirs["llama"])
    assert other["model.safetensors"] != base["model.safetensors"]
    assert other["tokenizer.json"] == base["tokenizer.json"]
    assert other["config.json"] == base["config.json"]


@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_names_follow_hf(tiny_dirs: dict[str, Path], arch: str) -> None:
    tensors = load_file(str(tiny_dirs[arch] / "model.safetensors"))
    layer = {
        f"model.layers.{i}.{suffix}"
        for i in range(SIZES["tiny"].num_layers)
        for suffix in (
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
        )
        + {
            "llama": (),
            "qwen2": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
            "qwen3": ("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
        }[arch]
    }
    expected = layer | {"model.embed_tokens.weight", "model.norm.weight"}
    if arch != "qwen3":  # qwen3 ties lm_head to the embedding, like Qwen3-0.6B
        expected.add("lm_head.weight")
    assert set(tensors) == expected
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 64)  # 2 kv heads x head_dim 16
    # Norm weights are ones-ish but not ones, so a norm that ignores its weight is caught.
    norm = tensors["model.norm.weight"]
    assert not torch.equal(norm, torch.ones_like(norm)) and (norm - 1).abs().max() < 1


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_count_and_config(tiny_dirs: dict[str, Path], arch: str) -> None:
    assert count_parameters(tiny_dirs[arch]) == TINY_PARAMS[arch]
    config = ModelConfig.from_dir(tiny_dirs[arch])
    assert config.family == arch
    assert (config.vocab_size, config.hidden_size, config.num_layers) == (1024, 64, 2)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    assert config.attention_bias is (arch == "qwen2")
    assert config.qk_norm is (arch == "qwen3")
    assert config.tie_word_embeddings is (arch == "qwen3")
    assert config.max_position_embeddings == 2048
    assert config.eos_token_ids == (2,) and config.bos_token_id == 0
    assert config.torch_dtype == "float32"


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_every_weight_and_generates(tiny_dirs: dict[str, Path], arch: str) -> None:
    model_dir = tiny_dirs[arch]
    loaded: Any = transformers.AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    model, info = loaded
    # A missing key would be randomly initialised by HF and silently break parity tests.
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert (
        type(model).__name__
        == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    )
    state = model.state_dict()
    for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        assert torch.equal(state[name], tensor), name

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompts = ["The quick brown fox", "Return a list of", "import os", "Hello world, this is", "socket"]
    num_eos_first = num_varied = 0
    for prompt in prompts:
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(input_ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
        generated = out[0, input_ids.shape[1] :].tolist()
        assert len(generated) == 12
        # Not degenerate: a random model should mostly neither stop at once nor loop on one token.
        num_eos_first += generated[0] in (0, 2)
        num_varied += len(set(generated)) > 2
    assert num_eos_first <= 1
    assert num_varied >= 3


def test_small_size_has_tens_of_millions_of_parameters(tmp_path: Path) -> None:
    model_dir = make_tiny_model(tmp_path / "small", "qwen2", "small", seed=0)
    num_params = count_parameters(model_dir)
    assert 20_000_000 < num_params < 60_000_000
    config = ModelConfig.from_dir(model_dir)
    assert (config.vocab_size, config.hidden_size, config.num_layers, config.max_position_embeddings) == (
        8192,
        512,
        8,
        8192,
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == 8192


def test_bad_arguments_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--arch"):
        make_tiny_model(tmp_path / "a", "gpt2", "tiny")
    with pytest.raises(ValueError, match="--size"):
        make_tiny_model(tmp_path / "b", "llama", "huge")
    with pytest.raises(ValueError, match="--seed"):
        make_tiny_model(tmp_path / "c", "llama", "tiny", seed=-1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        make_tiny_model(tmp_path / "file")


def test_refuses_non_empty_dir_unless_overwrite(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        make_tiny_model(tmp_path)
    make_tiny_model(tmp_path, overwrite=True)
    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def splitwise_script() -> Path:
    script = Path(sys.executable).parent / "splitwise"
    assert script.is_file(), f"console script {script} missing: run `pip install -e .` in this venv"
    return script


def test_cli_writes_the_same_model_as_the_api(tmp_path: Path) -> None:
    out_dir = tmp_path / "cli-model"
    result = subprocess.run(
        [str(splitwise_script()), "make-tiny-model", str(out_dir), "--arch", "qwen3", "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert str(out_dir) in result.stdout
    assert f"{TINY_PARAMS['qwen3']:,} parameters" in result.stdout
    # A separate process trained the tokenizer and drew the weights: still byte-identical.
    assert file_hashes(out_dir) == file_hashes(make_tiny_model(tmp_path / "api", "qwen3", "tiny", seed=3))


def test_cli_rejects_bad_input_with_usage_errors(tmp_path: Path) -> None:
    script = str(splitwise_script())
    bad_arch = subprocess.run(
        [script, "make-tiny-model", str(tmp_path / "m"), "--arch", "gpt2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad_arch.returncode == 2 and "--arch" in bad_arch.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    not_empty = subprocess.run(
        [script, "make-tiny-model", str(tmp_path / "full")], capture_output=True, text=True, timeout=60
    )
    assert not_empty.returncode == 2 and "not empty" in not_empty.stderr


def test_default_model_dir_builds_once_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPLITWISE_CACHE", str(tmp_path))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(default_model_dir("tiny"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = tmp_path / "models" / f"llama-tiny-seed0-v{FORMAT_VERSION}"
    assert results == [expected] * 3  # concurrent first uses agree on one complete model
    assert sorted(os.listdir(tmp_path / "models")) == [expected.name]  # no temp dirs left behind
    assert file_hashes(expected) == file_hashes(make_tiny_model(tmp_path / "ref", "llama", "tiny", seed=0))
    mtime = (expected / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir("tiny") == expected
    assert (expected / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_default_model_dir_validates_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITWISE_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="--size"):
        default_model_dir("medium")
    assert not (tmp_path / "models").exists()


# sha256 of the tiny tokenizer's (vocab by id, merges). If this changes (new corpus, trainer
# settings or tokenizers behaviour), bump FORMAT_VERSION so cached default models are rebuilt.
TINY_TOKENIZER_SHA256 = "a0a128ff24ed47765fd601e3c4b5c08d3f14c1dca4b80f6331de8b26e496e325"


def test_tokenizer_vocabulary_is_pinned(tiny_dirs: dict[str, Path]) -> None:
    model = json.loads((tiny_dirs["llama"] / "tokenizer.json").read_text())["model"]
    vocab_by_id = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(
        json.dumps([vocab_by_id, model["merges"]], ensure_ascii=False).encode()
    ).hexdigest()
    assert digest == TINY_TOKENIZER_SHA256, "tokenizer changed: bump FORMAT_VERSION and update this hash"
