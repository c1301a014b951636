"""Workload builders: random token prompts and ShareGPT parsing, with exact lengths."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from splitwise.bench.dataset import (
    SHAREGPT_MAX_PROMPT_TOKENS,
    length_bounds,
    load_sharegpt,
    random_requests,
    sharegpt_requests,
)
from splitwise.engine.tiny_model import default_model_dir
from splitwise.engine.tokenizer import Tokenizer

FIXTURE = Path(__file__).parent / "data" / "sharegpt_small.json"


class WordTokenizer:
    """One token per whitespace-separated word: token counts are easy to check by eye."""

    def __init__(self) -> None:
        self.words = ["<s>", "</s>"] + [f"w{i}" for i in range(98)]

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @property
    def special_tokens(self) -> dict[str, str]:
        return {"bos_token": "<s>", "eos_token": "</s>"}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self.words.index(w) if w in self.words else 2 for w in text.split()]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return " ".join(self.words[i] for i in ids)


def test_length_bounds() -> None:
    assert length_bounds(100, 0.0) == (100, 100)
    assert length_bounds(100, 0.25) == (75, 125)
    assert length_bounds(3, 0.5) == (1, 5)  # floor(1.5), ceil(4.5)
    assert length_bounds(1, 0.9) == (1, 2)  # never below one token


def test_random_token_prompts_have_the_drawn_lengths_and_no_special_tokens() -> None:
    tok = WordTokenizer()
    reqs = random_requests(
        tok, num_prompts=50, input_len=20, output_len=8, range_ratio=0.5, seed=3, as_text=False
    )
    assert len(reqs) == 50
    for r in reqs:
        assert isinstance(r.prompt, list)
        assert len(r.prompt) == r.prompt_tokens and 10 <= r.prompt_tokens <= 30
        assert 4 <= r.output_tokens <= 12
        assert not {0, 1} & set(r.prompt)  # bos/eos never drawn
    assert len({r.prompt_tokens for r in reqs}) > 5  # the range is really used


def test_random_prompts_are_reproducible_by_seed() -> None:
    tok = WordTokenizer()
    kwargs = {"num_prompts": 5, "input_len": 16, "output_len": 4, "range_ratio": 0.0, "as_text": False}
    assert random_requests(tok, seed=1, **kwargs) == random_requests(tok, seed=1, **kwargs)  # type: ignore[arg-type]
    assert random_requests(tok, seed=1, **kwargs) != random_requests(tok, seed=2, **kwargs)  # type: ignore[arg-type]
    exact = random_requests(tok, seed=1, **kwargs)  # type: ignore[arg-type]
    assert {(r.prompt_tokens, r.output_tokens) for r in exact} == {(16, 4)}


def test_random_text_prompts_with_the_real_tokenizer() -> None:
    tok = Tokenizer.from_dir(default_model_dir("tiny"))
    reqs = random_requests(
        tok, num_prompts=4, input_len=64, output_len=8, range_ratio=0.0, seed=0, as_text=True
    )
    for r in reqs:
        assert isinstance(r.prompt, str) and r.prompt
        assert r.prompt_tokens == len(tok.encode(r.prompt, add_special_tokens=False))
        assert 32 <= r.prompt_tokens <= 64  # re-encoding may merge tokens, never add past the cut
        assert r.output_tokens == 8


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"num_prompts": 0}, "--num-prompts"),
        ({"input_len": 0}, "--random-input-len"),
        ({"output_len": 0}, "--random-output-len"),
        ({"range_ratio": 1.0}, "--random-range-ratio"),
        ({"range_ratio": -0.1}, "--random-range-ratio"),
    ],
)
def test_random_rejects_bad_flags(kwargs: dict[str, float], flag: str) -> None:
    args: dict[str, object] = {
        "num_prompts": 2,
        "input_len": 8,
        "output_len": 4,
        "range_ratio": 0.0,
        "seed": 0,
        "as_text": False,
        **kwargs,
    }
    with pytest.raises(ValueError, match=flag):
        random_requests(WordTokenizer(), **args)  # type: ignore[arg-type]


def test_load_sharegpt_keeps_first_human_gpt_pairs() -> None:
    pairs = load_sharegpt(FIXTURE)
    # 8 entries: "one-turn", "not-text" and the bare string have no (prompt, reply) pair.
    assert len(pairs) == 5
    assert pairs[0] == (
        "please explain how a paged kv cache works in practice",
        "a paged cache splits the keys and values into fixed size blocks",
    )


def test_sharegpt_requests_filter_short_turns_and_measure_lengths() -> None:
    tok = WordTokenizer()
    reqs = sharegpt_requests(tok, FIXTURE, num_prompts=3, seed=0)
    prompts = {r.prompt: (r.prompt_tokens, r.output_tokens) for r in reqs}
    # "hi there" (2 words) and the reply "yes" (1 word) are below the 4-token minimum.
    assert prompts == {
        "please explain how a paged kv cache works in practice": (10, 12),
        "why split prefill and decode onto different machines": (8, 11),
        "what does time to first token measure exactly": (8, 12),
    }


def test_sharegpt_fixed_output_len_keeps_short_replies() -> None:
    reqs = sharegpt_requests(WordTokenizer(), FIXTURE, num_prompts=4, seed=0, output_len=7)
    assert {r.output_tokens for r in reqs} == {7}
    assert "say yes if you understand me" in {r.prompt for r in reqs}


def test_sharegpt_order_follows_the_seed() -> None:
    tok = WordTokenizer()
    orders = {
        tuple(r.prompt for r in sharegpt_requests(tok, FIXTURE, num_prompts=3, seed=s)) for s in range(6)
    }
    assert len(orders) > 1


def test_sharegpt_drops_prompts_past_the_limit(tmp_path: Path) -> None:
    long_prompt = " ".join(["w5"] * (SHAREGPT_MAX_PROMPT_TOKENS + 1))
    data = [
        {"conversations": [{"from": "human", "value": long_prompt}, {"from": "gpt", "value": "w1 w2 w3 w4"}]},
        {
            "conversations": [
                {"from": "human", "value": "w1 w2 w3 w4"},
                {"from": "gpt", "value": "w1 w2 w3 w4"},
            ]
        },
    ]
    path = tmp_path / "long.json"
    path.write_text(json.dumps(data))
    assert [r.prompt_tokens for r in sharegpt_requests(WordTokenizer(), path, num_prompts=1, seed=0)] == [4]


def test_sharegpt_errors_name_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--dataset-path: .* does not exist"):
        load_sharegpt(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="--dataset-path: .* not a readable JSON"):
        load_sharegpt(bad)
    obj = tmp_path / "obj.json"
    obj.write_text('{"conversations": []}')
    with pytest.raises(ValueError, match="--dataset-path: .* JSON list"):
        load_sharegpt(obj)
    with pytest.raises(
        ValueError, match=r"--dataset-path: .* has 3 usable conversations .*fewer than --num-prompts 10"
    ):
        sharegpt_requests(WordTokenizer(), FIXTURE, num_prompts=10, seed=0)
    with pytest.raises(ValueError, match="--sharegpt-output-len"):
        sharegpt_requests(WordTokenizer(), FIXTURE, num_prompts=1, seed=0, output_len=0)
