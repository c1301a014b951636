"""Deterministic random-weight checkpoints in Hugging Face format, for tests, demos and benchmarks.

``make_tiny_model(dir, arch, size, seed)`` writes a directory that both splitwise and
``transformers`` load: config.json, generation_config.json, model.safetensors, tokenizer.json and
tokenizer_config.json (ChatML chat template). The same arguments give byte-identical files, so
tests can compare against golden hashes and two processes (prefill and decode) can each build
"the same model" independently.

The tokenizer is a byte-level BPE trained on ``splitwise/assets/corpus.txt`` (Python stdlib
docstrings) at the size's vocabulary; training takes well under a second.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

BOS_TOKEN = "<|endoftext|>"  # also the pad token, as in Qwen
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
# Trainer order fixes the ids: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2.
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, IM_START_TOKEN, EOS_TOKEN)

CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}\n"
    "{{- raise_exception('unknown role ' + message['role'] + '; expected system, user, assistant or tool') }}\n"
    "{%- endif %}\n"
    "{%- if message['content'] is not string %}\n"
    "{{- raise_exception('message content must be a string') }}\n"
    "{%- endif %}\n"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Qwen2's split: letters runs, single digits, punctuation runs, newlines, whitespace.
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Bump when the generated files change, so cached default models are rebuilt rather than reused.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of one size. head_dim * num_heads need not equal hidden_size (as in Qwen3)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int


SIZES: dict[str, ModelShape] = {
    # Well under 1M parameters: loads and runs in milliseconds in unit tests.
    "tiny": ModelShape(
        vocab_size=1024,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=2048,
    ),
    # The tiny shape with one KV head (MQA) and with a KV head per query head (MHA): tensor
    # parallelism replicates KV heads when TP > num_kv_heads, splits them otherwise (#14).
    "tiny-mqa": ModelShape(
        vocab_size=1024,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=1,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=2048,
    ),
    "tiny-mha": ModelShape(
        vocab_size=1024,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=2048,
    ),
    # 28-32M parameters: prefill of a few thousand tokens costs real time, so P/D splitting shows.
    "small": ModelShape(
        vocab_size=8192,
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        intermediate_size=1408,
        max_position_embeddings=8192,
    ),
}

# Per-architecture details that real checkpoints of that family have, so loaders are exercised.
ROPE_THETA = {"llama": 10000.0, "qwen2": 1000000.0, "qwen3": 1000000.0}
TIED_EMBEDDINGS = {"llama": False, "qwen2": False, "qwen3": True}

INIT_STD = 0.02  # written to config.json as initializer_range; only HF's own re-init would use it
# Gains on top of fan-in scaling (std = gain / sqrt(fan_in)), chosen by measuring greedy output:
# - QK_GAIN: sharper attention, so which positions a token attends to matters.
# - OUT_GAIN: attention/MLP outputs dominate the embedding in the residual stream. Otherwise a
#   tied-embedding model (qwen3 here) scores the current token highest and echoes it forever.
QK_GAIN = 2.0
OUT_GAIN = 4.0
# Std of the logits. With HF's 0.02 init they are ~0.1 apart and greedy output is a near-tie
# lottery (fragile to float error when comparing implementations); ~2 gives clear winners.
LOGIT_STD = 2.0


def _check_args(arch: str, size: str, seed: int) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"--arch: {arch!r} is not one of {sorted(ARCHITECTURES)}")
    if size not in SIZES:
        raise ValueError(f"--size: {size!r} is not one of {sorted(SIZES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"--seed: {seed!r} must be an integer in [0, 2**63)")


def _corpus_text() -> str:
    return resources.files("splitwise").joinpath("assets/corpus.txt").read_text(encoding="utf-8")


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE with the ChatML special tokens; deterministic for a given corpus and vocab_size."""
    tokenizer = Tokenizer(models.BPE())
    # Exactly the pipeline transformers' Qwen2Tokenizer rebuilds: for model_type qwen2 it ignores
    # tokenizer.json's normalizer and pre-tokenizer, so only this choice makes HF agree with us.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,  # the corpus is small; 2 would stop short of the 8k vocabulary
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, emoji included
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_text().split("\n\n"), trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"corpus too small: trained {tokenizer.get_vocab_size()} tokens, wanted {vocab_size}"
        )
    # Llama-3 style: byte-level offsets, then bos in front of every encoded text.
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN}:0 $A:0",
                pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
                special_tokens=[(BOS_TOKEN, SPECIAL_TOKENS.index(BOS_TOKEN))],
            ),
        ]
    )
    return tokenizer


def _config(arch: str, shape: ModelShape) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_position_embeddings,
        "initializer_range": INIT_STD,
        "rms_norm_eps": 1e-6,
        "rope_theta": ROPE_THETA[arch],
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": TIED_EMBEDDINGS[arch],
        "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif arch == "qwen2":  # q/k/v biases are implied by the architecture (no attention_bias field)
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=shape.num_layers)
    else:
        config.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
    return dict(sorted(config.items()))


def _generation_config() -> dict[str, Any]:
    # Qwen-style: generation stops on <|im_end|> (end of turn) or <|endoftext|> (end of document).
    return {
        "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
        "eos_token_id": [SPECIAL_TOKENS.index(EOS_TOKEN), SPECIAL_TOKENS.index(BOS_TOKEN)],
        "pad_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
    }


def _tokenizer_config(shape: ModelShape) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": BOS_TOKEN,
        "unk_token": None,  # byte-level BPE never needs one (and Qwen2Tokenizer would default it)
        "add_bos_token": True,  # informational: tokenizer.json's post-processor does it
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": shape.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }


def _weights(arch: str, shape: ModelShape, seed: int) -> dict[str, torch.Tensor]:
    """HF-named float32 tensors drawn from one seeded generator in a fixed order."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def normal(*dims: int, std: float) -> torch.Tensor:
        return torch.randn(*dims, generator=gen, dtype=torch.float32) * std

    def norm_weight(dim: int) -> torch.Tensor:
        # Not exactly ones: an implementation that forgets to multiply by the weight must fail tests.
        return 1.0 + normal(dim, std=0.1)

    h, hd, inter = shape.hidden_size, shape.head_dim, shape.intermediate_size
    q_out, kv_out = shape.num_heads * hd, shape.num_kv_heads * hd

    def linear(out_features: int, in_features: int, gain: float = 1.0) -> torch.Tensor:
        # Fan-in scaling keeps activations O(1): q.k scores then vary by ~1 across positions, so
        # attention is far from uniform and a rope/mask/position bug changes the output visibly.
        # (HF's 0.02 init makes attention uniform and hides such bugs.)
        return normal(out_features, in_features, std=gain / math.sqrt(in_features))

    # Embedding rows have norm ~LOGIT_STD, so tied models (logits = final hidden . embedding) also
    # get logits of std ~LOGIT_STD from the unit-RMS final hidden state.
    w: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": normal(shape.vocab_size, h, std=LOGIT_STD / math.sqrt(h))
    }
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm_weight(h)
        w[p + "self_attn.q_proj.weight"] = linear(q_out, h, QK_GAIN)
        w[p + "self_attn.k_proj.weight"] = linear(kv_out, h, QK_GAIN)
        w[p + "self_attn.v_proj.weight"] = linear(kv_out, h)
        if arch == "qwen2":
            w[p + "self_attn.q_proj.bias"] = normal(q_out, std=0.1)
            w[p + "self_attn.k_proj.bias"] = normal(kv_out, std=0.1)
            w[p + "self_attn.v_proj.bias"] = normal(kv_out, std=0.1)
        if arch == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm_weight(hd)
            w[p + "self_attn.k_norm.weight"] = norm_weight(hd)
        w[p + "self_attn.o_proj.weight"] = linear(h, q_out, OUT_GAIN)
        w[p + "post_attention_layernorm.weight"] = norm_weight(h)
        w[p + "mlp.gate_proj.weight"] = linear(inter, h)
        w[p + "mlp.up_proj.weight"] = linear(inter, h)
        w[p + "mlp.down_proj.weight"] = linear(h, inter, OUT_GAIN)
    w["model.norm.weight"] = norm_weight(h)
    if not TIED_EMBEDDINGS[arch]:
        w["lm_head.weight"] = linear(shape.vocab_size, h, LOGIT_STD)
    return w


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_model(
    out_dir: str | Path, arch: str = "llama", size: str = "tiny", seed: int = 0, *, overwrite: bool = False
) -> Path:
    """Write a random-weight HF checkpoint into ``out_dir`` and return its path.

    ``out_dir`` must not exist or be empty unless ``overwrite`` (then our files are replaced and
    anything else in it is left alone). Raises ValueError for a bad argument, FileExistsError for
    a non-empty directory.
    """
    _check_args(arch, size, seed)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty (pass --overwrite to replace the model files in it)")
    out.mkdir(parents=True, exist_ok=True)
    shape = SIZES[size]
    _write_json(out / "config.json", _config(arch, shape))
    _write_json(out / "generation_config.json", _generation_config())
    _write_json(out / "tokenizer_config.json", _tokenizer_config(shape))
    train_tokenizer(shape.vocab_size).save(str(out / "tokenizer.json"), pretty=True)
    # Fixed metadata and no timestamps: the file depends on the tensors only. Serialised to bytes
    # and written by us, so the file gets the usual umask-derived mode (save_file makes it 0600).
    weights = save(_weights(arch, shape, seed), metadata={"format": "pt"})
    (out / "model.safetensors").write_bytes(weights)
    return out


def count_parameters(model_dir: str | Path) -> int:
    """Number of parameters stored in ``model_dir``/model.safetensors (tied lm_head counted once)."""
    total = 0
    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
            total += math.prod(f.get_slice(name).get_shape())
    return total


def cache_root() -> Path:
    """$SPLITWISE_CACHE, else ~/.cache/splitwise."""
    env = os.environ.get("SPLITWISE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "splitwise"


def default_model_dir(size: str = "tiny", arch: str = "llama", seed: int = 0) -> Path:
    """The built-in model used when no --model is given; generated on first use, then reused.

    Built in a temporary sibling directory and renamed into place, so concurrent first uses
    (several test workers, prefill and decode processes) never see a half-written model: one
    rename wins and the others discard their copy.
    """
    _check_args(arch, size, seed)
    final = cache_root() / "models" / f"{arch}-{size}-seed{seed}-v{FORMAT_VERSION}"
    if (final / "model.safetensors").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        make_tiny_model(tmp, arch, size, seed)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared by users of one machine
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "model.safetensors").is_file():  # lost the race is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
