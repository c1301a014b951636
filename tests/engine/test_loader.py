"""Checkpoint loading: what loads, and that every broken checkpoint is a ModelLoadError naming
the problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from splitwise.engine.config import ModelConfig
from splitwise.engine.errors import ModelLoadError, UnsupportedArchitectureError
from splitwise.engine.loader import load_model, weight_files
from splitwise.engine.model import CausalLM

TINY: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def save_tiny_llama(path: Path, **overrides: Any) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def load(path: Path) -> CausalLM:
    return load_model(path, ModelConfig.from_dir(path), dtype=torch.float32, device="cpu")


def edit_config(path: Path, **changes: Any) -> None:
    config_path = path / "config.json"
    data = json.loads(config_path.read_text())
    data.update(changes)
    config_path.write_text(json.dumps(data))


def edit_weights(path: Path, edit: Any) -> None:
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors")


def test_loads_every_tensor_of_the_checkpoint(tmp_path: Path) -> None:
    save_tiny_llama(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")

    model = load(tmp_path)

    params = dict(model.named_parameters())
    assert set(params) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(params[name], tensor), name


def test_tied_embeddings_share_one_parameter_even_if_lm_head_is_stored(tmp_path: Path) -> None:
    save_tiny_llama(tmp_path, tie_word_embeddings=True)
    # Some tied checkpoints also store a copy of lm_head.weight; it must be accepted and ignored.
    edit_weights(tmp_path, lambda w: w.__setitem__("lm_head.weight", w["model.embed_tokens.weight"].clone()))

    model = load(tmp_path)

    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_bfloat16_load_converts_weights(tmp_path: Path) -> None:
    save_tiny_llama(tmp_path)
    model = load_model(tmp_path, ModelConfig.from_dir(tmp_path), dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_no_weight_files(tmp_path: Path) -> None:
    save_tiny_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weight files"):
        load(tmp_path)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    save_tiny_llama(tmp_path)
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        weight_files(tmp_path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    save_tiny_llama(tmp_path)
    edit_weights(tmp_path, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"missing tensor\(s\) 'model.layers.1.mlp.up_proj.weight'"):
        load(tmp_path)


def test_untied_checkpoint_without_lm_head_is_missing_a_tensor(tmp_path: Path) -> None:
    save_tiny_llama(tmp_path)
    edit_weights(tmp_path, lambda w: w.pop("lm_head.weight"))
    with pytest.raises(ModelLoadError, match="'lm_head.weight'"):
        load(tmp_path)


def test_wrong_shape_names_tensor_expected_and_got(tmp_path: Path) -> None:
    save_tiny_llama(tmp_path)
    edit_weights(
        tmp_path, lambda w: w.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(8, 32))
    )
    with pytest.raises(ModelLoadError) as info:
        load(tmp_path)
    message = str(info.value)
    assert "'model.layers.0.self_attn.k_proj.weight'" in message
    assert "shape (8, 32)" in message
    assert "expected (16, 32)" in message  # 2 kv heads * head_dim 8


def test_unexpected_tensor_is_rejected(tmp_path: Path) -> None:
    save_tiny_llama(tmp_path)
    edit_weights(tmp_path, lambda w: w.__setitem__("model.layers.0.mlp.gate_proj.bias", torch.zeros(48)))
    with pytest.raises(ModelLoadError, match="unexpected tensor 'model.layers.0.mlp.gate_proj.bias'"):
        load(tmp_path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    save_tiny_llama(tmp_path)
    edit_config(tmp_path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedArchitectureError, match="'GPT2LMHeadModel' is not supported"):
        load(tmp_path)
    assert issubclass(UnsupportedArchitectureError, ModelLoadError)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}},  # transformers >= 5
        {"rope_scaling": {"type": "yarn", "factor": 4.0}, "rope_theta": 10000.0},  # older config.json
    ],
)
def test_unknown_rope_type(tmp_path: Path, rope: dict[str, Any]) -> None:
    save_tiny_llama(tmp_path)
    config_path = tmp_path / "config.json"
    data = json.loads(config_path.read_text())
    data.pop("rope_parameters", None)
    data.update(rope)
    config_path.write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="rope type 'yarn' is not supported"):
        load(tmp_path)


def test_llama3_rope_missing_a_field_is_named(tmp_path: Path) -> None:
    save_tiny_llama(tmp_path)
    edit_config(tmp_path, rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 500.0})
    with pytest.raises(ModelLoadError, match="'low_freq_factor'"):
        load(tmp_path)


def test_model_config_reads_both_rope_config_formats() -> None:
    base = {"architectures": ["LlamaForCausalLM"], **TINY}
    base["num_attention_heads"] = 4
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}

    new = ModelConfig.from_dict({**base, "rope_parameters": {**llama3, "rope_theta": 500000.0}})
    old = ModelConfig.from_dict({**base, "rope_scaling": llama3, "rope_theta": 500000.0})
    plain = ModelConfig.from_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 123.0}})

    assert (new.rope_theta, new.rope_scaling) == (500000.0, llama3)
    assert (old.rope_theta, old.rope_scaling) == (500000.0, llama3)
    assert (plain.rope_theta, plain.rope_scaling) == (123.0, None)


def test_qwen_sliding_window_layers_are_refused() -> None:
    from splitwise.engine.config import ModelConfig
    from splitwise.engine.errors import UnsupportedArchitectureError

    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 8,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "use_sliding_window": True,
        "sliding_window": 4,
    }
    with pytest.raises(UnsupportedArchitectureError, match="use_sliding_window"):
        ModelConfig.from_dict(cfg)
    cfg["use_sliding_window"] = False
    assert ModelConfig.from_dict(cfg).sliding_window is None
