"""Structured outputs: grammars compiled with xgrammar, one matcher per constrained request.

Why xgrammar (measured with bench/grammar_mask_cost.py on this CPU, same schema and token walk,
interleaved): fill-mask + accept costs a median 2.5 us per token at vocab 1k and 3.5 us at vocab
8k, against llguidance's 10.4 us and 14.1 us; compile times are both a few ms. The mask is the
per-step cost every constrained row pays, so it decides.

Kinds (``SamplingParams.structured_kind`` / ``structured_spec``):

    json         a JSON schema (text)          compact JSON (no free whitespace: a model that
    json_object  any JSON value (spec unused)   loops on spaces could otherwise never finish)
    regex        a regular expression
    choice       a JSON list of strings: the output is exactly one of them
    grammar      an EBNF grammar (xgrammar's GBNF dialect)

A matcher is state derived from the output tokens only, so a decode node re-creates it from the
tokens the prefill node sampled (``GrammarCompiler.matcher(..., accepted=...)``): the grammar survives
the P->D hand-off without any matcher state on the wire.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence as SequenceOf
from functools import lru_cache
from typing import Any

import torch
import xgrammar as xgr

from splitwise.engine.errors import InvalidRequestError
from splitwise.engine.tokenizer import Tokenizer


class GrammarCompileError(InvalidRequestError):
    """The schema / regex / grammar does not compile (the API answers 400 naming the field)."""


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False when the grammar rejects it (then the state is unchanged)."""
        if self._matcher.is_terminated():
            return True  # the stop token was accepted already; anything after it is the caller's
        return bool(self._matcher.accept_token(token_id))

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    @property
    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())


class GrammarCompiler:
    """Compiles structured-output specs for one tokenizer and vocabulary width, with a cache."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: SequenceOf[int]) -> None:
        self.vocab_size = vocab_size
        vocab = tokenizer.vocab()
        encoded = [""] * vocab_size
        for token, index in vocab.items():
            if index < vocab_size:
                encoded[index] = token
        metadata = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.backend_json())
        self._info = xgr.TokenizerInfo(
            encoded,
            metadata["vocab_type"],
            vocab_size=vocab_size,
            stop_token_ids=sorted(set(stop_token_ids)) or None,
            add_prefix_space=metadata["add_prefix_space"],
        )
        self._compiler = xgr.GrammarCompiler(self._info, max_threads=1)
        self._cached = lru_cache(maxsize=256)(self._compile_uncached)

    def compile(self, kind: str, spec: str) -> xgr.CompiledGrammar:
        """Raises GrammarCompileError with the library's reason."""
        return self._cached(kind, spec)

    def matcher(self, kind: str, spec: str, *, accepted: SequenceOf[int] = ()) -> GrammarMatcher:
        """A fresh matcher advanced through ``accepted`` (tokens sampled elsewhere, e.g. on P)."""
        matcher = GrammarMatcher(self.compile(kind, spec))
        for token_id in accepted:
            matcher.accept(token_id)
        return matcher

    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        mask: torch.Tensor = xgr.allocate_token_bitmask(num_rows, self.vocab_size)
        return mask

    def _compile_uncached(self, kind: str, spec: str) -> xgr.CompiledGrammar:
        try:
            if kind == "json":
                return self._compiler.compile_json_schema(spec, any_whitespace=False, separators=(",", ":"))
            if kind == "json_object":
                return self._compiler.compile_builtin_json_grammar()
            if kind == "regex":
                return self._compiler.compile_regex(spec)
            if kind == "choice":
                return self._compiler.compile_regex(choice_regex(json.loads(spec)))
            if kind == "grammar":
                return self._compiler.compile_grammar(spec)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GrammarCompileError(f"{kind} does not compile: {_first_line(exc)}") from None
        raise GrammarCompileError(f"unknown structured output kind {kind!r}")


def choice_regex(choices: Any) -> str:
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise GrammarCompileError("choice must be a non-empty list of strings")
    return "(" + "|".join(regex_escape(c) for c in choices) + ")"


_REGEX_SPECIAL = frozenset("\\.^$|?*+()[]{}")


def regex_escape(text: str) -> str:
    """``text`` as a literal regex. Only metacharacters are escaped: xgrammar warns on escapes
    it does not know (Python's ``re.escape`` also escapes spaces)."""
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar's packed int32 bitmask [rows, ceil(vocab/32)] as bool [rows, vocab] (True = allowed)."""
    shifts = torch.arange(32, dtype=torch.int32)
    bits = (bitmask[:, :, None] >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    # xgrammar prefixes its C++ messages with "[hh:mm:ss] /path/file.cc:line: "
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", line)
