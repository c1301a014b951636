"""Per-token grammar mask cost: xgrammar vs llguidance on this machine (CPU).

Both libraries compile the same JSON schema against the same tokenizer, then walk the same token
sequence (the tokenizer's own encoding of a document that satisfies the schema): at each position
they fill the allowed-token bitmask and accept the token. Reported: compile time, and the median /
p90 per-token cost of "fill mask + accept", interleaved round by round so both see the same load.

    .venv/bin/python bench/grammar_mask_cost.py [--model DIR] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from splitwise.engine.tiny_model import default_model_dir

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 6},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "active"],
    "additionalProperties": False,
}
DOCUMENT = {
    "name": "Ada Lovelace of the quick brown fox",
    "age": 36,
    "tags": ["math", "engine", "poetry", "notes"],
    "address": {"city": "London", "zip": "12345"},
    "active": True,
}


def _xgrammar(
    tokenizer_json: str, vocab_size: int, eos: list[int]
) -> tuple[float, Callable[[list[int]], list[float]]]:
    import transformers
    import xgrammar as xgr

    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=_tokenizers(tokenizer_json))
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=eos)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    compile_s = time.perf_counter() - start
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def walk(tokens: list[int]) -> list[float]:
        matcher = xgr.GrammarMatcher(compiled)
        costs = []
        for token in tokens:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            ok = matcher.accept_token(token)
            costs.append(time.perf_counter() - t0)
            assert ok, f"xgrammar rejected token {token} at {len(costs)}"
        return costs

    return compile_s, walk


def _llguidance(
    tokenizer_json: str, vocab_size: int, eos: list[int]
) -> tuple[float, Callable[[list[int]], list[float]]]:
    import llguidance
    import llguidance.torch

    tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, defaults={"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    )
    probe = llguidance.LLMatcher(tokenizer, grammar)  # compilation is lazy; the first matcher pays it
    compile_s = time.perf_counter() - start
    assert not probe.is_error(), probe.get_error()
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)

    def walk(tokens: list[int]) -> list[float]:
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        costs = []
        for token in tokens:
            t0 = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            ok = matcher.consume_token(token)
            costs.append(time.perf_counter() - t0)
            assert ok, f"llguidance rejected token {token}: {matcher.get_error()}"
        return costs

    return compile_s, walk


def _tokenizers(tokenizer_json: str):  # type: ignore[no-untyped-def]
    import tokenizers

    return tokenizers.Tokenizer.from_str(tokenizer_json)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir (default: the tiny test model)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model = Path(args.model) if args.model else default_model_dir("tiny")
    tokenizer_json = (model / "tokenizer.json").read_text()
    config = json.loads((model / "config.json").read_text())
    vocab_size = int(config["vocab_size"])
    tok = _tokenizers(tokenizer_json)
    eos_id = tok.token_to_id("<|im_end|>")
    eos = [eos_id] if eos_id is not None else []
    tokens = tok.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False).ids
    torch.set_num_threads(1)
    libs = {
        "xgrammar": _xgrammar(tokenizer_json, vocab_size, eos),
        "llguidance": _llguidance(tokenizer_json, vocab_size, eos),
    }
    costs: dict[str, list[float]] = {name: [] for name in libs}
    for _ in range(args.rounds):
        for name, (_, walk) in libs.items():  # interleaved: both see the same machine load
            costs[name] += walk(tokens)
    print(f"model {model.name}: vocab {vocab_size}, {len(tokens)} tokens per walk, {args.rounds} rounds")
    for name, (compile_s, _) in libs.items():
        c = sorted(costs[name])
        print(
            f"{name:11s} compile {compile_s * 1e3:8.2f} ms   per token: median {statistics.median(c) * 1e6:8.1f} us"
            f"   p90 {c[int(0.9 * len(c))] * 1e6:8.1f} us   mean {statistics.fmean(c) * 1e6:8.1f} us"
        )


if __name__ == "__main__":
    main()
