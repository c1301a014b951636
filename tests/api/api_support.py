"""Fixtures for API tests: the real app on a real uvicorn server (own thread and event loop, on a
free loopback port), backed by the real in-process LocalScheduler and a scripted node that answers
with known tokens -- so text, stop strings, logprobs, failures and expiry are all exact.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvicorn
from fastapi import FastAPI

REPO_ROOT = str(Path(__file__).resolve().parents[2])
if sys.path[0] != REPO_ROOT:  # tests/scheduler shadows the ``scheduler`` package otherwise
    sys.path.insert(0, REPO_ROOT)

from scheduler.config import SchedulerConfig  # noqa: E402
from scheduler.local import LocalNode, LocalScheduler  # noqa: E402
from scheduler.messages import Failed, Finished, ResultMessage, SubmitRequest, TokenChunk, WorkItem  # noqa: E402
from scheduler.sim_node import make_node_info  # noqa: E402
from splitwise.api import ApiMetrics, FrontendBackend, create_app  # noqa: E402
from splitwise.engine.tiny_model import default_model_dir  # noqa: E402
from splitwise.engine.tokenizer import Tokenizer  # noqa: E402

T = TypeVar("T")
MODEL_ID = "tiny-test"
MAX_MODEL_LEN = 96
SCRIPT_TEXT = "Hello world. The quick brown fox jumps over the lazy dog. END of story."
TTL_S = 2.0
SLOW_TOKEN_DELAY_S = 0.03


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir("tiny"))


class RecordingBackend:
    """The real backend, with every submit and cancel recorded (read from the test thread)."""

    def __init__(self, inner: FrontendBackend) -> None:
        self.inner = inner
        self.submitted: list[SubmitRequest] = []
        self.cancelled: list[str] = []
        self.cancel_results: dict[str, bool] = {}

    async def submit(self, request: SubmitRequest) -> Any:
        self.submitted.append(request)
        return await self.inner.submit(request)

    async def cancel(self, req_id: str) -> bool:
        self.cancelled.append(req_id)
        self.cancel_results[req_id] = result = await self.inner.cancel(req_id)
        return result


class ScriptedNode:
    """A mixed node for the LocalScheduler that answers with SCRIPT_TEXT's tokens, one per chunk,
    with logprob ``-(index + 1) / 10`` (top_logprobs k: the chosen token, then the next k - 1 script tokens). Markers in the prompt change what it does:
    ``[slow]`` waits between tokens, ``[hang]`` never answers, ``[fail]`` fails, ``[fail-retry]``
    fails retryably, ``[fail-late]`` fails after two tokens, and ``[eos]`` ends with eos after three tokens. Stop strings are the API's job."""

    def __init__(self, node: LocalNode, tokenizer: Tokenizer) -> None:
        self.node = node
        self.tokenizer = tokenizer
        self.script = tokenizer.encode(SCRIPT_TEXT, add_special_tokens=False)
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopped_by_cancel: list[str] = []

    async def run(self) -> None:
        while True:
            work = await self.node.next_work()
            task = asyncio.create_task(self.serve(work))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def serve(self, work: WorkItem) -> None:
        prompt = self.tokenizer.decode(work.prompt_token_ids)
        if "[hang]" in prompt:
            return
        if "[fail" in prompt and "[fail-late]" not in prompt:
            await self._end(
                work,
                Failed(
                    req_id=work.req_id,
                    attempt=work.attempt,
                    code="engine_error",
                    message="simulated failure",
                    retryable="[fail-retry]" in prompt,
                ),
            )
            return
        max_tokens = work.sampling_params.max_tokens
        script = self.script[:3] + [self.tokenizer.eos_token_ids[0]] if "[eos]" in prompt else self.script
        index = 0
        while index < min(max_tokens, len(script)):
            if self.node.is_cancelled(work.req_id, work.attempt):
                self.stopped_by_cancel.append(work.req_id)
                return
            if "[fail-late]" in prompt and index == 2:
                await self._end(
                    work,
                    Failed(
                        req_id=work.req_id,
                        attempt=work.attempt,
                        code="engine_error",
                        message="simulated failure mid-stream",
                    ),
                )
                return
            if "[slow]" in prompt:
                await asyncio.sleep(SLOW_TOKEN_DELAY_S)
            # top_logprobs k: the chosen token first, then the next script tokens, 1 nat apart each.
            k = work.sampling_params.top_logprobs
            top = [script[(index + j) % len(script)] for j in range(k)]
            await self.node.publish(
                TokenChunk(
                    req_id=work.req_id,
                    attempt=work.attempt,
                    index=index,
                    token_ids=[script[index]],
                    logprobs=[-(index + 1) / 10],
                    top_token_ids=[top] if k else None,
                    top_logprobs=[[-(index + 1) / 10 - j for j in range(k)]] if k else None,
                )
            )
            index += 1
        reason = "length" if index == max_tokens else "stop"
        await self._end(
            work,
            Finished(
                req_id=work.req_id,
                attempt=work.attempt,
                finish_reason=reason,
                prompt_tokens=len(work.prompt_token_ids),
                completion_tokens=index,
            ),
        )

    async def _end(self, work: WorkItem, terminal: ResultMessage) -> None:
        await self.node.publish(terminal)
        await self.node.ack(work)


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class ServerThread:
    """uvicorn serving ``build()``'s app in its own thread and event loop (the backend lives there too)."""

    build: Callable[[], Awaitable[FastAPI]]
    cleanup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    _started: Future[str] = field(default_factory=Future)

    @property
    def base_url(self) -> str:
        return self._started.result(timeout=0)

    def start(self, timeout_s: float = 30.0) -> ServerThread:
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main()), name="api-server", daemon=True
        )
        self._thread.start()
        self._started.result(timeout=timeout_s)
        return self

    async def _main(self) -> None:
        sock = _bound_socket()
        try:
            self.loop = asyncio.get_running_loop()
            app = await self.build()
            config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
            self._server = uvicorn.Server(config)
            serving = asyncio.create_task(self._server.serve(sockets=[sock]))
            while not self._server.started and not serving.done():
                await asyncio.sleep(0.01)
            host, port = sock.getsockname()
            self._started.set_result(f"http://{host}:{port}")
            await serving
        except BaseException as exc:
            if not self._started.done():
                self._started.set_exception(exc)
            raise
        finally:
            for close in reversed(self.cleanup):
                await close()
            sock.close()

    def call(self, coro: Awaitable[T], timeout_s: float = 10.0) -> T:
        """Run a coroutine on the server's loop (inspect backend state from a test)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
            assert not self._thread.is_alive(), "API server thread did not stop"


@dataclass
class LocalStack:
    """What a test can reach: the server, its backend recorder, its node and metrics."""

    server: ServerThread
    backend: RecordingBackend
    node: ScriptedNode
    metrics: ApiMetrics
    ready: dict[str, bool]

    @property
    def base_url(self) -> str:
        return self.server.base_url


def start_local_stack(
    tokenizer: Tokenizer, *, api_key: str | None = None, with_node: bool = True
) -> LocalStack:
    """Without a node the LocalScheduler has no capacity: every submit raises NoCapacityError."""
    holder: dict[str, Any] = {}
    ready = {"value": True}
    metrics = ApiMetrics(model_name=MODEL_ID)

    async def build() -> FastAPI:
        config = SchedulerConfig(scheduler_name="local", scheduler_ttl_s=TTL_S, heartbeat_interval_s=0.05)
        sched = LocalScheduler(config, model_id=MODEL_ID)
        if with_node:
            await sched.node.start(make_node_info("n0", "mixed", model_id=MODEL_ID))
        await sched.frontend.start()
        node = ScriptedNode(sched.node, tokenizer)
        runner = asyncio.create_task(node.run())

        async def close() -> None:
            runner.cancel()
            for task in list(node.tasks):
                task.cancel()
            await asyncio.gather(runner, *node.tasks, return_exceptions=True)
            await sched.frontend.close()
            await sched.node.close()

        server.cleanup.append(close)
        backend = RecordingBackend(sched.frontend)
        holder.update(backend=backend, node=node)
        metrics.add_counters_source(
            "splitwise_scheduler_events", sched.stats.snapshot, "Scheduler events and failures."
        )
        return create_app(
            frontend=backend,
            tokenizer=tokenizer,
            model_id=MODEL_ID,
            max_model_len=MAX_MODEL_LEN,
            api_key=api_key,
            is_ready=lambda: ready["value"],
            metrics=metrics,
        )

    server = ServerThread(build)  # bound before start(): build() runs in the server thread
    server.start()
    return LocalStack(server, holder["backend"], holder["node"], metrics, ready)


@pytest.fixture(scope="module")
def local_stack(tokenizer: Tokenizer) -> Iterator[LocalStack]:
    stack = start_local_stack(tokenizer)
    yield stack
    stack.server.stop()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
