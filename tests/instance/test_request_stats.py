"""vLLM's request phases as RequestStats measures them on the engine thread, with an injected
clock and a stand-in engine (exact values)."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitwise.api.metrics import ApiMetrics
from splitwise.engine.outputs import RequestOutput
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import FinishReason, Sequence, SequenceStatus
from splitwise.instance.request_stats import RequestStats


@dataclass
class _Stats:
    num_computed_tokens: int = 0


@dataclass
class _Scheduler:
    seqs: dict[str, Sequence] = field(default_factory=dict)

    def get(self, req_id: str) -> Sequence | None:
        return self.seqs.get(req_id)


@dataclass
class _Engine:
    scheduler: _Scheduler = field(default_factory=_Scheduler)
    stats: _Stats = field(default_factory=_Stats)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _sample(metrics: ApiMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"model_name": "m", **labels})
    return 0.0 if value is None else value


def test_phases_of_a_mixed_request() -> None:
    metrics, clock, engine = ApiMetrics(model_name="m"), _Clock(), _Engine()
    stats = RequestStats(metrics, clock=clock)
    seq = Sequence(req_id="r", prompt_token_ids=[1, 2, 3], params=SamplingParams(), arrival_s=0.0)
    engine.scheduler.seqs["r"] = seq
    stats.added(engine, "r", prefill_only=False)  # type: ignore[arg-type]
    clock.now = 1.0
    stats.stepped(engine)  # type: ignore[arg-type]  # still waiting: not scheduled
    seq.status, seq.num_computed_tokens, engine.stats.num_computed_tokens = SequenceStatus.RUNNING, 3, 3
    clock.now = 2.0
    stats.stepped(engine)  # type: ignore[arg-type]  # scheduled at 2.0, a 3-token step
    clock.now = 2.5
    stats.delivered([RequestOutput(req_id="r", new_token_ids=[7])])
    clock.now = 4.5
    stats.delivered([RequestOutput(req_id="r", new_token_ids=[8], finish_reason=FinishReason.LENGTH)])
    assert _sample(metrics, "vllm:request_queue_time_seconds_sum") == 2.0
    assert _sample(metrics, "vllm:request_prefill_time_seconds_sum") == 0.5
    assert _sample(metrics, "vllm:request_decode_time_seconds_sum") == 2.0
    assert _sample(metrics, "vllm:request_inference_time_seconds_sum") == 2.5
    assert _sample(metrics, "vllm:iteration_tokens_total_sum") == 3
    assert _sample(metrics, "vllm:request_success_total", finished_reason="length") == 1


def test_prefill_only_and_prefilled_requests() -> None:
    metrics, clock, engine = ApiMetrics(model_name="m"), _Clock(), _Engine()
    stats = RequestStats(metrics, clock=clock)
    # P: a prefill-only request has no decode phase and no finish reason of its own.
    seq = Sequence(
        req_id="p", prompt_token_ids=[1], params=SamplingParams(), arrival_s=0.0, prefill_only=True
    )
    engine.scheduler.seqs["p"] = seq
    stats.added(engine, "p", prefill_only=True)  # type: ignore[arg-type]
    seq.status = SequenceStatus.RUNNING
    clock.now = 1.0
    stats.stepped(engine)  # type: ignore[arg-type]
    stats.delivered([RequestOutput(req_id="p", new_token_ids=[5], finish_reason=FinishReason.PREFILL_DONE)])
    assert _sample(metrics, "vllm:request_prefill_time_seconds_count") == 1
    assert _sample(metrics, "vllm:request_decode_time_seconds_count") == 0
    assert _sample(metrics, "vllm:request_success_total", finished_reason="stop") == 0
    # D: admitted with its KV from P (never added here): decode and inference, no queue or prefill.
    clock.now = 10.0
    stats.delivered([RequestOutput(req_id="d", new_token_ids=[5])])
    clock.now = 13.0
    stats.delivered([RequestOutput(req_id="d", new_token_ids=[6], finish_reason=FinishReason.STOP)])
    assert _sample(metrics, "vllm:request_queue_time_seconds_count") == 1  # P's only
    assert _sample(metrics, "vllm:request_decode_time_seconds_sum") == 3.0
    assert _sample(metrics, "vllm:request_success_total", finished_reason="stop") == 1
    # An abort of a request that never ran is counted, with no phase.
    stats.delivered([RequestOutput(req_id="x", finish_reason=FinishReason.ABORT, error="bad")])
    assert _sample(metrics, "vllm:request_success_total", finished_reason="abort") == 1
