"""When does a sequence stop? Two checks, run after each appended token.

``check_token`` looks at token ids and lengths (the scheduler calls it in ``postprocess``);
``check_text`` looks for stop strings in the detokenized output (the engine calls it after
detokenizing, and finishes the sequence with ``Scheduler.finish`` on a match). The text check is
separate because only the engine holds the detokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import FinishReason, Sequence


@dataclass(frozen=True)
class StopStringMatch:
    stop: str  # the stop string that matched
    text: str  # the output text cut just before the stop string


class StopChecker:
    def __init__(self, *, eos_token_ids: Iterable[int] = (), max_model_len: int | None = None) -> None:
        if max_model_len is not None and max_model_len < 1:
            raise ValueError(f"--max-model-len: {max_model_len} must be >= 1")
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def check_token(self, seq: Sequence) -> FinishReason | None:
        """The reason ``seq`` stops after its last appended output token, or None to go on.

        Stop tokens win over lengths, so a request that ends on eos at max_tokens reports STOP.
        """
        if not seq.output_token_ids:
            return None
        params = seq.params
        last = seq.output_token_ids[-1]
        if (not params.ignore_eos and last in self.eos_token_ids) or last in params.stop_token_ids:
            return FinishReason.STOP
        if seq.num_output_tokens >= params.max_tokens:
            return FinishReason.LENGTH
        if self.max_model_len is not None and seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def check_text(self, params: SamplingParams, text: str, num_new_chars: int) -> StopStringMatch | None:
        """Find the earliest stop string that ends inside the last ``num_new_chars`` of ``text``.

        ``text`` is the whole output text so far. A stop string may start in earlier text (it
        spans token boundaries), so each search starts ``len(stop) - 1`` characters before the new
        ones; matches wholly inside older text were already reported (or did not exist).
        """
        best: StopStringMatch | None = None
        best_index = len(text)
        for stop in params.stop:
            start = max(0, len(text) - num_new_chars - len(stop) + 1)
            index = text.find(stop, start)
            if index != -1 and index < best_index:
                best, best_index = StopStringMatch(stop=stop, text=text[:index]), index
        return best
