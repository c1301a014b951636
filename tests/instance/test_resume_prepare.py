"""A re-dispatched request resumes after the tokens its client already has (issue #13, item 2):
when those tokens already end it (max_tokens reached, a stop token), the attempt answers at once
and never generates one token too many (the resume computed ``max(1, 0)`` before)."""

from __future__ import annotations

from typing import Any

from scheduler.messages import Assignment, WorkItem
from splitwise.codes import Mode
from splitwise.engine.sampling_params import SamplingParams
from splitwise.instance.node_runtime import prepare


def _item(resume: list[int], **params: Any) -> WorkItem:
    return WorkItem(
        req_id="r1",
        prompt_token_ids=[1, 2, 3],
        sampling_params=SamplingParams(**params),
        frontend_id="F1",
        created_ms=0,
        deadline_ms=10**12,
        attempt=1,
        resume_token_ids=resume,
        assignment=Assignment(mode=Mode.MIXED, prefill_node_id="m", decode_node_id="m"),
    )


def test_resume_with_max_tokens_reached_finishes_without_generating() -> None:
    req = prepare(_item(list(range(10, 42)), max_tokens=32))
    assert req.finished_by == "length" and req.first_index == 32
    over = prepare(_item(list(range(10, 45)), max_tokens=32))
    assert over.finished_by == "length"


def test_resume_with_tokens_left_generates_exactly_the_rest() -> None:
    req = prepare(_item([7, 8, 9], max_tokens=32, min_tokens=5))
    assert req.finished_by is None
    assert req.params.max_tokens == 29 and req.params.min_tokens == 2
    assert req.prompt_token_ids == [1, 2, 3, 7, 8, 9] and req.first_index == 3
    past_min = prepare(_item([7, 8, 9], max_tokens=4, min_tokens=4))
    assert past_min.params.max_tokens == 1 and past_min.params.min_tokens == 1


def test_resume_after_a_stop_token_finishes_with_stop() -> None:
    req = prepare(_item([7, 99], max_tokens=32, stop_token_ids=(99,)))
    assert req.finished_by == "stop"
    # below min_tokens a stop token does not end the request: the resume continues
    early = prepare(_item([99], max_tokens=32, min_tokens=3, stop_token_ids=(99,)))
    assert early.finished_by is None


def test_first_attempt_is_unchanged() -> None:
    req = prepare(_item([], max_tokens=5, min_tokens=2))
    assert req.params.max_tokens == 5 and req.params.min_tokens == 2 and req.first_index == 0


def test_resume_after_the_models_eos_finishes_with_stop_unless_eos_is_ignored() -> None:
    eos = frozenset({2})
    req = prepare(_item([7, 2], max_tokens=32), eos)
    assert req.finished_by == "stop" and req.first_index == 2
    ignored = prepare(_item([7, 2], max_tokens=32, ignore_eos=True), eos)
    assert ignored.finished_by is None and ignored.params.max_tokens == 30
    unknown = prepare(_item([7, 2], max_tokens=32))  # no eos given: nothing to detect
    assert unknown.finished_by is None
