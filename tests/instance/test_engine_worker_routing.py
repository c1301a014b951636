"""EngineWorker's thread rule, step by step: the engine thread only posts events to the loop; the
loop alone creates, routes to and removes the output queues. The engine "thread" here is a plain
thread the test starts and joins, so the order of events is fixed, never timed."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from splitwise.engine.errors import EngineError
from splitwise.engine.outputs import RequestOutput
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import FinishReason
from splitwise.engine.stop_checker import StopChecker
from splitwise.instance.engine_worker import EngineWorker


@dataclass
class _Config:
    block_size: int = 4


@dataclass
class _BlockManager:
    num_blocks: int = 8
    num_free_blocks: int = 8
    usage: float = 0.0


@dataclass
class _Scheduler:
    num_running: int = 0
    num_waiting: int = 0


@dataclass
class FakeEngine:
    """The few engine attributes the worker reads, and a log of what it was asked."""

    config: _Config = field(default_factory=_Config)
    block_manager: _BlockManager = field(default_factory=_BlockManager)
    scheduler: _Scheduler = field(default_factory=_Scheduler)
    added: list[str] = field(default_factory=list)
    threads: set[str] = field(default_factory=set)
    runner: object = None  # a single-process runner: no tensor-parallel ranks to watch
    stop_checker: StopChecker = field(default_factory=StopChecker)

    def num_queued_prefill_tokens(self) -> int:
        return 0

    def add_request(self, req_id: str, prompt: list[int], params: SamplingParams, **_: Any) -> None:
        self.threads.add(threading.current_thread().name)
        self.added.append(req_id)

    def abort(self, req_id: str) -> None:
        self.threads.add(threading.current_thread().name)


def on_engine_thread(fn: Callable[[], None]) -> None:
    """Run ``fn`` on another thread and wait for it WITHOUT yielding to the loop: whatever it
    posted to the loop has not run yet when this returns."""
    thread = threading.Thread(target=fn, name="fake-engine-thread")
    thread.start()
    thread.join()


def drain(worker: EngineWorker) -> None:
    on_engine_thread(lambda: worker._drain_commands(block=False))


def finished(req_id: str) -> RequestOutput:
    return RequestOutput(req_id=req_id, new_token_ids=[7], finish_reason=FinishReason.STOP)


def test_the_engine_thread_posts_outputs_and_the_loop_routes_them() -> None:
    async def body() -> None:
        engine = FakeEngine()
        worker = EngineWorker(engine, asyncio.get_running_loop())  # type: ignore[arg-type]
        old = worker.submit("r1", [1, 2], SamplingParams())
        drain(worker)
        assert engine.added == ["r1"] and engine.threads == {"fake-engine-thread"}
        on_engine_thread(lambda: worker._deliver([finished("r1")]))
        # The last output is posted, not yet routed: the engine thread changed no loop state, so
        # a second request with this id is refused instead of receiving r1's last output.
        assert old.empty()
        with pytest.raises(EngineError, match="still running"):
            worker.submit("r1", [3], SamplingParams())
        await asyncio.sleep(0)  # the loop runs the posted event
        assert old.get_nowait().finish_reason is FinishReason.STOP
        new = worker.submit("r1", [3], SamplingParams())  # routed and removed: the id is free again
        drain(worker)
        on_engine_thread(lambda: worker._deliver([finished("r1")]))
        await asyncio.sleep(0)
        assert new.get_nowait().new_token_ids == [7] and old.empty()

    asyncio.run(body())


def test_a_step_failure_fails_exactly_the_requests_in_the_engine() -> None:
    async def body() -> None:
        engine = FakeEngine()
        worker = EngineWorker(engine, asyncio.get_running_loop())  # type: ignore[arg-type]
        running = worker.submit("r1", [1], SamplingParams())
        drain(worker)
        waiting = worker.attach("r2")  # a prefilled request whose admission has not run yet
        on_engine_thread(lambda: worker._deliver(worker._fail_all("internal engine error: boom")))
        await asyncio.sleep(0)
        out = running.get_nowait()
        assert out.finish_reason is FinishReason.ABORT and out.error == "internal engine error: boom"
        assert waiting.empty()  # not in the engine: its admission reports for itself

    asyncio.run(body())
