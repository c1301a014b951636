"""Benchmark workloads: the requests a serving benchmark sends, made reproducible by a seed.

Two sources, as in vLLM's ``bench serve``:

* ``random``: prompts of random token ids. Lengths are drawn uniformly from
  ``[floor(L * (1 - r)), ceil(L * (1 + r))]`` for ``L`` = ``--random-input-len`` / ``--random-output-len``
  and ``r`` = ``--random-range-ratio`` (``r = 0``: every request has exactly ``L``). Special tokens
  (bos/eos/pad) are never drawn, so a prompt cannot end a request early or confuse a template.
  The prompt is sent as token ids where the endpoint takes them (``/v1/completions``); for chat it is
  decoded to text, re-encoded and cut to the drawn length, so its length is right up to the template.
* ``sharegpt``: a ShareGPT-format JSON file (a list of ``{"conversations": [{"from": "human",
  "value": ...}, {"from": "gpt", "value": ...}, ...]}``). The first human turn is the prompt; the
  token count of the reply that follows is the requested output length (or ``--sharegpt-output-len``).
  Conversations that are too short or too long are skipped, as vLLM does.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# vLLM's ShareGPT filters: drop tiny turns (they measure nothing) and pairs past a 2k context.
SHAREGPT_MIN_TOKENS = 4
SHAREGPT_MAX_PROMPT_TOKENS = 1024
SHAREGPT_MAX_TOTAL_TOKENS = 2048


class BenchTokenizer(Protocol):
    """What the workload builders need from a tokenizer (splitwise's ``Tokenizer`` fits)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def special_tokens(self) -> dict[str, str]: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class SampleRequest:
    """One request of a workload. ``prompt`` is text or token ids; the lengths are what we asked for
    (the server's usage report, when it sends one, is what the metrics use)."""

    prompt: str | list[int]
    prompt_tokens: int
    output_tokens: int


def length_bounds(length: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive [low, high] for ``length`` with ``range_ratio`` (never below 1)."""
    low = max(1, math.floor(length * (1 - range_ratio)))
    high = max(low, math.ceil(length * (1 + range_ratio)))
    return low, high


def _special_ids(tokenizer: BenchTokenizer) -> set[int]:
    ids: set[int] = set()
    for token in set(tokenizer.special_tokens.values()):
        ids.update(tokenizer.encode(token, add_special_tokens=False))
    return ids


def random_requests(
    tokenizer: BenchTokenizer,
    *,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
    as_text: bool,
) -> list[SampleRequest]:
    """``num_prompts`` random-token requests (see the module doc). Raises ValueError naming the flag."""
    if num_prompts < 1:
        raise ValueError(f"--num-prompts: must be at least 1, got {num_prompts}")
    if input_len < 1:
        raise ValueError(f"--random-input-len: must be at least 1, got {input_len}")
    if output_len < 1:
        raise ValueError(f"--random-output-len: must be at least 1, got {output_len}")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio: must be in [0, 1), got {range_ratio}")
    special = _special_ids(tokenizer)
    allowed = [i for i in range(tokenizer.vocab_size) if i not in special]
    if not allowed:
        raise ValueError("--tokenizer: the vocabulary has no ordinary tokens to draw prompts from")
    rng = random.Random(seed)
    in_low, in_high = length_bounds(input_len, range_ratio)
    out_low, out_high = length_bounds(output_len, range_ratio)
    requests = []
    for _ in range(num_prompts):
        num_in = rng.randint(in_low, in_high)
        num_out = rng.randint(out_low, out_high)
        ids = [rng.choice(allowed) for _ in range(num_in)]
        if as_text:
            # Decoding then re-encoding merges or splits tokens; cut back to the drawn length.
            ids = tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False)[:num_in]
            text = tokenizer.decode(ids)
            requests.append(
                SampleRequest(text, len(tokenizer.encode(text, add_special_tokens=False)), num_out)
            )
        else:
            requests.append(SampleRequest(ids, num_in, num_out))
    return requests


def _first_pair(entry: Any) -> tuple[str, str] | None:
    """(human prompt, gpt reply) of one ShareGPT entry, or None when it has no such pair."""
    if not isinstance(entry, dict):
        return None
    turns = entry.get("conversations", entry.get("conversation"))
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    first, second = turns[0], turns[1]
    if not (isinstance(first, dict) and isinstance(second, dict)):
        return None
    prompt, reply = first.get("value"), second.get("value")
    if not (isinstance(prompt, str) and isinstance(reply, str)):
        return None
    return prompt, reply


def load_sharegpt(path: str | Path) -> list[tuple[str, str]]:
    """Every (prompt, reply) pair of a ShareGPT JSON file, in file order."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--dataset-path: {file} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--dataset-path: {file} is not a readable JSON file ({exc})") from None
    if not isinstance(data, list):
        raise ValueError(
            f"--dataset-path: {file} must hold a JSON list of conversations, got {type(data).__name__}"
        )
    return [pair for pair in (_first_pair(e) for e in data) if pair is not None]


def sharegpt_requests(
    tokenizer: BenchTokenizer,
    path: str | Path,
    *,
    num_prompts: int,
    seed: int,
    output_len: int | None = None,
) -> list[SampleRequest]:
    """``num_prompts`` requests from a ShareGPT file, shuffled by ``seed``, filtered as vLLM does.
    Raises ValueError naming the flag when the file has too few usable conversations."""
    if num_prompts < 1:
        raise ValueError(f"--num-prompts: must be at least 1, got {num_prompts}")
    if output_len is not None and output_len < 1:
        raise ValueError(f"--sharegpt-output-len: must be at least 1, got {output_len}")
    pairs = load_sharegpt(path)
    random.Random(seed).shuffle(pairs)
    requests: list[SampleRequest] = []
    for prompt, reply in pairs:
        if len(requests) == num_prompts:
            break
        num_in = len(tokenizer.encode(prompt, add_special_tokens=False))
        num_out = (
            output_len if output_len is not None else len(tokenizer.encode(reply, add_special_tokens=False))
        )
        if num_in < SHAREGPT_MIN_TOKENS or (output_len is None and num_out < SHAREGPT_MIN_TOKENS):
            continue
        if num_in > SHAREGPT_MAX_PROMPT_TOKENS or num_in + num_out > SHAREGPT_MAX_TOTAL_TOKENS:
            continue
        requests.append(SampleRequest(prompt, num_in, num_out))
    if len(requests) < num_prompts:
        raise ValueError(
            f"--dataset-path: {path} has {len(requests)} usable conversations "
            f"(first turn {SHAREGPT_MIN_TOKENS}..{SHAREGPT_MAX_PROMPT_TOKENS} tokens, with its reply at most "
            f"{SHAREGPT_MAX_TOTAL_TOKENS}), fewer than --num-prompts {num_prompts}"
        )
    return requests
