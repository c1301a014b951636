"""Per-token cost of streaming detokenization (a script, not a test).

Compares splitwise's ``IncrementalDetokenizer`` (``tokenizers``' DecodeStream) with the window
re-decode it replaced (decode ids[prefix:read] and ids[prefix:], emit the difference: two full
decodes per token), on the built-in small model's tokenizer and the bundled corpus, interleaved,
best of N; prints microseconds per token and the ratio:

    .venv/bin/python bench/detokenizer.py [--tokens 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from splitwise.engine.tiny_model import default_model_dir  # noqa: E402
from splitwise.engine.tokenizer import IncrementalDetokenizer, Tokenizer  # noqa: E402


class WindowDetokenizer:
    """The reference: the hand-written algorithm splitwise used before DecodeStream."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self._tok = tokenizer
        self._ids = list(prompt_ids[-5:])
        self._prefix, self._read = 0, len(self._ids)

    def add_token(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._tok.decode(self._ids[self._prefix : self._read])
        new = self._tok.decode(self._ids[self._prefix :])
        if len(new) <= len(prefix) or new.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return new[len(prefix) :]


def run_once(make: Callable[[], object], ids: list[int]) -> float:
    detok = make()
    start = time.perf_counter()
    for token_id in ids:
        detok.add_token(token_id)  # type: ignore[attr-defined]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tok = Tokenizer.from_dir(default_model_dir("small"))
    text = (ROOT / "splitwise" / "assets" / "corpus.txt").read_text()
    ids = tok.encode(text, add_special_tokens=False)[: args.tokens]
    prompt = ids[:8]
    window, stream = [], []
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both
        window.append(run_once(lambda: WindowDetokenizer(tok, prompt), ids))
        stream.append(run_once(lambda: IncrementalDetokenizer(tok, prompt), ids))
    w, s = min(window), min(stream)
    print(
        f"tokens={len(ids)} window={w * 1e6 / len(ids):.1f} us/token DecodeStream={s * 1e6 / len(ids):.1f} us/token"
    )
    print(f"ratio DecodeStream / window = {s / w:.2f}")


if __name__ == "__main__":
    main()
