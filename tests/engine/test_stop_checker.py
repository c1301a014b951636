from __future__ import annotations

import pytest

from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import FinishReason, Sequence
from splitwise.engine.stop_checker import StopChecker, StopStringMatch


def seq_with(outputs: list[int], *, prompt_len: int = 3, **params: object) -> Sequence:
    seq = Sequence(req_id="r", prompt_token_ids=list(range(prompt_len)), params=SamplingParams(**params))  # type: ignore[arg-type]
    seq.output_token_ids.extend(outputs)
    return seq


@pytest.fixture()
def checker() -> StopChecker:
    return StopChecker(eos_token_ids=(2, 99), max_model_len=10)


def test_no_output_or_ordinary_token_goes_on(checker: StopChecker) -> None:
    assert checker.check_token(seq_with([])) is None
    assert checker.check_token(seq_with([5], max_tokens=4)) is None


def test_eos_stops_unless_ignored(checker: StopChecker) -> None:
    assert checker.check_token(seq_with([5, 99])) is FinishReason.STOP
    assert checker.check_token(seq_with([5, 99], ignore_eos=True)) is None


def test_stop_token_ids_stop_even_with_ignore_eos(checker: StopChecker) -> None:
    assert checker.check_token(seq_with([7], stop_token_ids=(7,), ignore_eos=True)) is FinishReason.STOP


def test_max_tokens_is_length(checker: StopChecker) -> None:
    assert checker.check_token(seq_with([5, 6], max_tokens=2)) is FinishReason.LENGTH
    assert checker.check_token(seq_with([5], max_tokens=2)) is None


def test_stop_token_wins_over_length(checker: StopChecker) -> None:
    assert checker.check_token(seq_with([5, 2], max_tokens=2)) is FinishReason.STOP


def test_max_model_len_is_length(checker: StopChecker) -> None:
    assert checker.check_token(seq_with([5, 5, 5], prompt_len=7, max_tokens=100)) is FinishReason.LENGTH
    assert checker.check_token(seq_with([5, 5], prompt_len=7, max_tokens=100)) is None


def test_stop_string_spanning_tokens_truncates_before_it(checker: StopChecker) -> None:
    params = SamplingParams(stop=("world",))
    assert checker.check_text(params, "hello wor", 3) is None
    assert checker.check_text(params, "hello world!", 3) == StopStringMatch(stop="world", text="hello ")


def test_stop_string_only_in_old_text_is_not_reported_again(checker: StopChecker) -> None:
    params = SamplingParams(stop=("STOP",))
    assert checker.check_text(params, "a STOP bcd", 3) is None


def test_earliest_stop_string_wins(checker: StopChecker) -> None:
    params = SamplingParams(stop=("cd", "b"))
    assert checker.check_text(params, "abcd", 4) == StopStringMatch(stop="b", text="a")


def test_no_stop_strings_never_match(checker: StopChecker) -> None:
    assert checker.check_text(SamplingParams(), "anything", 8) is None


def test_invalid_max_model_len_is_rejected() -> None:
    with pytest.raises(ValueError):
        StopChecker(max_model_len=0)
