"""Per-request output text: incremental detokenization plus stop strings, as final deltas.

A stop string may span tokens, so text that could be the start of a stop string is held back
until the next token decides it (vLLM does the same). What ``push`` returns is never retracted::

    full text so far:  | emitted ............ | held back (< longest stop) |
"""

from __future__ import annotations

from dataclasses import dataclass

from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.stop_checker import StopChecker
from splitwise.engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(frozen=True)
class TextDelta:
    text: str
    stop: str | None = None  # set when a stop string ended the request (text cut before it)


class TextStream:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self._params = params
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        self._num_emitted = 0

    @property
    def text(self) -> str:
        return self._detok.text

    def push(self, token_id: int, stop_checker: StopChecker) -> TextDelta:
        """Feed one generated token; returns the text that became final and any stop string hit."""
        new = self._detok.add_token(token_id)
        if self._params.stop and new:
            match = stop_checker.check_text(self._params, self._detok.text, len(new))
            if match is not None:
                return TextDelta(self._take(match.text, len(match.text)), stop=match.stop)
        final_len = max(self._num_emitted, len(self._detok.text) - self._holdback)
        return TextDelta(self._take(self._detok.text, final_len))

    def finish(self) -> str:
        """The request ended for another reason: release held-back and partial text."""
        self._detok.flush()
        return self._take(self._detok.text, len(self._detok.text))

    def _take(self, text: str, upto: int) -> str:
        delta = text[self._num_emitted : upto]
        self._num_emitted = max(self._num_emitted, upto)
        return delta
