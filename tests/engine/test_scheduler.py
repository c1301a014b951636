from __future__ import annotations

import pytest

from splitwise.engine.block_manager import BlockManager
from splitwise.engine.errors import InvalidRequestError, UnknownRequestError
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.scheduler import PostprocessResult, Scheduler, SchedulerOutput
from splitwise.engine.sequence import FinishReason, Sequence, SequenceStatus
from splitwise.engine.stop_checker import StopChecker

EOS = 2
TOKEN = 100  # what the fake sampler always returns


def make_scheduler(
    *, num_blocks: int = 8, block_size: int = 4, max_num_seqs: int = 8, max_num_batched_tokens: int = 64
) -> Scheduler:
    return Scheduler(
        BlockManager(num_blocks, block_size),
        StopChecker(eos_token_ids=(EOS,)),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
    )


def make_seq(req_id: str, num_prompt_tokens: int, *, first_token: int = 10, **params: object) -> Sequence:
    prompt = list(range(first_token, first_token + num_prompt_tokens))
    return Sequence(req_id=req_id, prompt_token_ids=prompt, params=SamplingParams(**params))  # type: ignore[arg-type]


def run_step(
    sched: Scheduler, tokens: dict[str, int] | None = None
) -> tuple[SchedulerOutput, PostprocessResult]:
    """schedule() + fake sampling (a token for EVERY chunk, as a runner sampling all rows would)."""
    out = sched.schedule()
    sampled = {c.seq.req_id: ((tokens or {}).get(c.seq.req_id, TOKEN), -0.5) for c in out.chunks}
    return out, sched.postprocess(out, sampled)


def chunks_of(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(c.seq.req_id, c.num_new_tokens) for c in out.chunks]


def test_single_request_prefills_decodes_and_frees_everything() -> None:
    sched = make_scheduler()
    seq = make_seq("a", 6, max_tokens=3)
    sched.add(seq)
    out, res = run_step(sched)
    assert chunks_of(out) == [("a", 6)]
    assert seq.block_table == [0, 1]
    assert res.sampled == [seq] and seq.output_token_ids == [TOKEN] and seq.output_logprobs == [-0.5]
    out, _ = run_step(sched)
    assert chunks_of(out) == [("a", 1)]
    out, res = run_step(sched)
    assert res.finished == [seq]
    assert seq.finish_reason is FinishReason.LENGTH and seq.status is SequenceStatus.FINISHED
    assert seq.output_token_ids == [TOKEN] * 3
    assert sched.block_manager.num_referenced_blocks == 0
    assert not sched.has_unfinished()
    assert sched.schedule().is_empty


def test_eos_finishes_with_stop() -> None:
    sched = make_scheduler()
    seq = make_seq("a", 3, max_tokens=10)
    sched.add(seq)
    run_step(sched)
    _, res = run_step(sched, {"a": EOS})
    assert res.finished == [seq] and seq.finish_reason is FinishReason.STOP
    assert sched.block_manager.num_referenced_blocks == 0


def test_chunked_prefill_respects_the_token_budget() -> None:
    sched = make_scheduler(num_blocks=16, max_num_batched_tokens=8)
    seq = make_seq("a", 20, max_tokens=5)
    sched.add(seq)
    out, res = run_step(sched)
    assert chunks_of(out) == [("a", 8)] and res.sampled == [] and seq.num_computed_tokens == 8
    assert seq.block_table == [0, 1]
    out, res = run_step(sched)
    assert chunks_of(out) == [("a", 8)] and res.sampled == [] and seq.output_token_ids == []
    out, res = run_step(sched)
    assert chunks_of(out) == [("a", 4)] and res.sampled == [seq] and seq.output_token_ids == [TOKEN]
    assert seq.block_table == [0, 1, 2, 3, 4]


def test_decodes_go_first_and_a_prefill_takes_the_rest_of_the_budget() -> None:
    sched = make_scheduler(num_blocks=16, max_num_batched_tokens=8)
    sched.add(make_seq("a", 3, max_tokens=10))
    run_step(sched)
    sched.add(make_seq("b", 20, first_token=50))
    out, _ = run_step(sched)
    assert chunks_of(out) == [("a", 1), ("b", 7)]
    out, _ = run_step(sched)
    assert chunks_of(out) == [("a", 1), ("b", 7)]
    out, _ = run_step(sched)
    assert chunks_of(out) == [("a", 1), ("b", 6)]
    out, _ = run_step(sched)
    assert chunks_of(out) == [("a", 1), ("b", 1)]  # b decodes now


def test_max_num_seqs_limits_admission() -> None:
    sched = make_scheduler(max_num_seqs=2)
    for req_id in "abc":
        sched.add(make_seq(req_id, 2, first_token=ord(req_id), max_tokens=2))
    out, _ = run_step(sched)
    assert chunks_of(out) == [("a", 2), ("b", 2)]
    assert (sched.num_running, sched.num_waiting) == (2, 1)
    out, _ = run_step(sched)  # a and b finish (max_tokens 2)
    out, _ = run_step(sched)
    assert chunks_of(out) == [("c", 2)]


def test_prefix_cache_hit_reuses_blocks_of_a_finished_request() -> None:
    sched = make_scheduler()
    a = make_seq("a", 9, max_tokens=1)
    sched.add(a)
    run_step(sched)
    assert a.is_finished and sched.block_manager.num_referenced_blocks == 0
    b = make_seq("b", 9, max_tokens=2)
    sched.add(b)
    out, _ = run_step(sched)
    assert chunks_of(out) == [("b", 1)]
    assert b.num_cached_tokens == 8
    assert b.block_table[:2] == [0, 1]


def test_preemption_by_recompute_when_the_pool_runs_out() -> None:
    sched = make_scheduler(num_blocks=4, block_size=2)
    a = make_seq("a", 3, first_token=10, max_tokens=4)
    b = make_seq("b", 3, first_token=20, max_tokens=4)
    sched.add(a)
    sched.add(b)
    out, _ = run_step(sched)
    assert chunks_of(out) == [("a", 3), ("b", 3)]
    assert (a.block_table, b.block_table) == ([0, 1], [2, 3])
    out, _ = run_step(sched)  # both decode within their blocks; each now has 5 tokens
    assert chunks_of(out) == [("a", 1), ("b", 1)]
    out, _ = run_step(sched)  # a needs a 3rd block: b (admitted last) is preempted
    assert out.preempted == [b] and chunks_of(out) == [("a", 1)]
    assert b.status is SequenceStatus.WAITING and b.num_preemptions == 1
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.output_token_ids == [TOKEN] * 2
    # b's blocks were freed tail first (3, then 2): block 3 was the least recently freed.
    assert a.block_table == [0, 1, 3]
    # b's first block [20, 21] (block 2) is still cached, but a 5-token b needs 2 more blocks.
    out, res = run_step(sched)
    assert chunks_of(out) == [("a", 1)] and sched.num_waiting == 1
    assert res.finished == [a] and a.finish_reason is FinishReason.LENGTH
    # b comes back and recomputes its prompt AND its 2 output tokens before sampling the 3rd.
    out, res = run_step(sched)
    assert chunks_of(out) == [("b", 3)]
    # a's blocks, all cached, were freed tail first (3, 1, 0): they are evicted in that order.
    assert b.num_cached_tokens == 2 and b.block_table == [2, 3, 1]
    assert res.sampled == [b] and b.output_token_ids == [TOKEN] * 3
    _, res = run_step(sched)
    assert res.finished == [b] and b.output_token_ids == [TOKEN] * 4
    assert sched.block_manager.num_referenced_blocks == 0


def test_sequence_that_cannot_fit_alone_fails_instead_of_looping() -> None:
    sched = make_scheduler(num_blocks=2, block_size=2)
    seq = make_seq("a", 3, max_tokens=10)
    sched.add(seq)
    run_step(sched)
    run_step(sched)  # 5 tokens now; the 5th needs a 3rd block
    out, _ = run_step(sched)
    assert out.failed == [seq] and out.chunks == []
    assert seq.finish_reason is FinishReason.ABORT and seq.is_finished
    assert sched.block_manager.num_referenced_blocks == 0 and not sched.has_unfinished()


def test_blocks_held_by_a_reservation_make_a_sequence_wait_then_resume() -> None:
    sched = make_scheduler(num_blocks=3, block_size=2)
    bm = sched.block_manager
    assert bm.reserve("x", 2) == [0]
    seq = make_seq("a", 3, max_tokens=10)
    sched.add(seq)
    run_step(sched)
    run_step(sched)
    out, _ = run_step(sched)  # needs a 3rd block; only the reservation could free one
    assert out.preempted == [seq] and out.chunks == [] and out.failed == []
    out, _ = run_step(sched)
    assert out.is_empty and sched.num_waiting == 1  # both its blocks are hits, no room for a 3rd
    bm.release("x")
    out, _ = run_step(sched)
    assert chunks_of(out) == [("a", 1)] and seq.num_cached_tokens == 4
    assert seq.output_token_ids == [TOKEN] * 3


def test_add_rejects_bad_requests() -> None:
    sched = make_scheduler(num_blocks=2, block_size=2)
    with pytest.raises(InvalidRequestError):
        sched.add(make_seq("a", 5))  # 3 blocks > the 2-block pool
    with pytest.raises(InvalidRequestError):
        sched.add(Sequence(req_id="e", prompt_token_ids=[], params=SamplingParams()))
    sched.add(make_seq("a", 2))
    with pytest.raises(InvalidRequestError):
        sched.add(make_seq("a", 2))


@pytest.mark.parametrize("state", ["waiting", "prefilling", "decoding", "held"])
def test_abort_in_any_state_frees_everything(state: str) -> None:
    sched = make_scheduler(num_blocks=8, max_num_batched_tokens=4)
    seq = make_seq("a", 10 if state == "prefilling" else 3, max_tokens=5)
    seq.prefill_only = state == "held"
    sched.add(seq)
    if state != "waiting":
        run_step(sched)
    if state == "decoding":
        run_step(sched)
    assert sched.get("a") is seq
    aborted = sched.abort("a")
    assert aborted is seq and seq.finish_reason is FinishReason.ABORT and seq.is_finished
    assert seq.block_table == []
    assert sched.block_manager.num_referenced_blocks == 0
    assert not sched.has_unfinished() and sched.num_held == 0
    with pytest.raises(UnknownRequestError):
        sched.abort("a")


def test_abort_between_schedule_and_postprocess_is_skipped() -> None:
    sched = make_scheduler()
    seq = make_seq("a", 3)
    sched.add(seq)
    out = sched.schedule()
    sched.abort("a")
    res = sched.postprocess(out, {"a": (TOKEN, 0.0)})
    assert res.sampled == [] and seq.output_token_ids == []
    assert sched.block_manager.num_referenced_blocks == 0


def test_completed_chunk_without_a_sampled_token_is_an_error() -> None:
    sched = make_scheduler()
    sched.add(make_seq("a", 3))
    out = sched.schedule()
    with pytest.raises(ValueError):
        sched.postprocess(out, {})


def test_prefill_only_keeps_blocks_until_released() -> None:
    sched = make_scheduler()
    seq = make_seq("a", 6, max_tokens=10)
    seq.prefill_only = True
    sched.add(seq)
    _, res = run_step(sched)
    assert res.finished == [seq] and seq.finish_reason is FinishReason.PREFILL_DONE
    assert seq.output_token_ids == [TOKEN] and seq.block_table == [0, 1]
    assert sched.num_held == 1 and not sched.has_unfinished()
    assert sched.block_manager.referenced_block_ids() == [0, 1]
    assert sched.release_prefilled("a") is seq
    assert sched.block_manager.num_referenced_blocks == 0
    with pytest.raises(UnknownRequestError):
        sched.release_prefilled("a")


def test_prefill_only_that_is_already_complete_still_holds_its_blocks() -> None:
    """max_tokens=1: the request is over after this token, but its KV may still be in flight to the
    decode node, so it is held like any other prefill-only sequence until released."""
    sched = make_scheduler()
    seq = make_seq("a", 6, max_tokens=1)
    seq.prefill_only = True
    sched.add(seq)
    _, res = run_step(sched)
    assert res.finished == [seq] and seq.finish_reason is FinishReason.PREFILL_DONE
    assert sched.num_held == 1 and sched.block_manager.num_referenced_blocks == 2
    sched.release_prefilled("a")
    assert sched.num_held == 0 and sched.block_manager.num_referenced_blocks == 0


def test_prefilled_sequence_adopts_its_reservation_and_decodes() -> None:
    sched = make_scheduler()
    bm = sched.block_manager
    reserved = bm.reserve("d", 6)
    seq = make_seq("d", 6, max_tokens=3)
    seq.output_token_ids.append(77)  # the first token, sampled on the prefill instance
    seq.num_computed_tokens = 6
    sched.add_prefilled(seq)
    assert seq.block_table == reserved == [0, 1] and bm.num_cached_blocks == 1
    out, _ = run_step(sched)
    assert chunks_of(out) == [("d", 1)]
    run_step(sched)
    assert seq.finish_reason is FinishReason.LENGTH and seq.output_token_ids == [77, TOKEN, TOKEN]
    assert bm.num_referenced_blocks == 0


def test_prefilled_sequence_without_exactly_one_pending_token_is_rejected() -> None:
    sched = make_scheduler()
    sched.block_manager.reserve("d", 6)
    seq = make_seq("d", 6)
    seq.num_computed_tokens = 6
    with pytest.raises(InvalidRequestError):
        sched.add_prefilled(seq)  # no first output token appended
    assert sched.block_manager.has_reservation("d")


def test_finish_from_outside_frees_blocks_and_records_the_stop_text() -> None:
    sched = make_scheduler()
    seq = make_seq("a", 3, max_tokens=10)
    sched.add(seq)
    run_step(sched)
    assert sched.finish("a", FinishReason.STOP, stop_text="###") is seq
    assert seq.stop_text == "###" and seq.finish_reason is FinishReason.STOP
    assert sched.block_manager.num_referenced_blocks == 0
    with pytest.raises(UnknownRequestError):
        sched.finish("a", FinishReason.STOP)


def test_many_requests_under_pressure_all_finish_without_leaks() -> None:
    sched = make_scheduler(num_blocks=6, block_size=2, max_num_seqs=4, max_num_batched_tokens=6)
    seqs = [make_seq(f"r{i}", 2 + i % 4, first_token=10 * i, max_tokens=3 + i % 3) for i in range(8)]
    for seq in seqs:
        sched.add(seq)
    num_preempted = 0
    for _ in range(200):
        if not sched.has_unfinished():
            break
        out, _ = run_step(sched)
        num_preempted += len(out.preempted)
        assert out.num_batched_tokens <= 6 and len(out.chunks) <= 4
        assert not out.failed
    assert not sched.has_unfinished()
    assert num_preempted > 0  # the pool is small enough to force recompute
    assert all(s.finish_reason is FinishReason.LENGTH for s in seqs)
    assert [s.num_output_tokens for s in seqs] == [s.params.max_tokens for s in seqs]
    assert sched.block_manager.num_referenced_blocks == 0


def test_abort_of_a_queued_prefilled_sequence_frees_its_adopted_blocks() -> None:
    sched = make_scheduler()
    sched.block_manager.reserve("d", 6)
    seq = make_seq("d", 6)
    seq.output_token_ids.append(77)
    seq.num_computed_tokens = 6
    sched.add_prefilled(seq)
    assert sched.num_waiting == 1 and sched.block_manager.num_referenced_blocks == 2
    assert sched.abort("d") is seq
    assert sched.block_manager.num_referenced_blocks == 0 and not sched.has_unfinished()


def test_queued_prefilled_sequences_holding_every_block_do_not_deadlock() -> None:
    sched = make_scheduler(num_blocks=2, block_size=2)
    bm = sched.block_manager
    first, second = make_seq("d1", 2, max_tokens=3), make_seq("d2", 2, first_token=50, max_tokens=2)
    for seq in (first, second):
        bm.reserve(seq.req_id, 2)
        seq.output_token_ids.append(77)
        seq.num_computed_tokens = 2
        sched.add_prefilled(seq)
    assert (first.block_table, second.block_table) == ([0], [1])
    # d1's next token needs a 2nd block; only d2 (queued, newest) can give one up.
    out, res = run_step(sched)
    assert out.preempted == [second] and chunks_of(out) == [("d1", 1)]
    assert second.block_table == [] and second.num_computed_tokens == 0 and second.num_preemptions == 1
    assert first.block_table == [0, 1] and res.sampled == [first]
    out, res = run_step(sched)  # the pool is d1's alone until it finishes
    assert chunks_of(out) == [("d1", 1)] and res.finished == [first]
    # d2 recomputes its prompt and its transferred first token, then samples its 2nd token.
    out, res = run_step(sched)
    assert chunks_of(out) == [("d2", 3)] and res.finished == [second]
    assert second.output_token_ids == [77, TOKEN]
    assert bm.num_referenced_blocks == 0
