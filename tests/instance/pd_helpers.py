"""Helpers for the P/D failure, cancel and security tests: /metrics, polling, streaming."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from splitwise.cluster import Child, LocalCluster


def metrics(child: Child) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the instance's /metrics: (name, sorted labels) -> value."""
    url = child.base_url.removesuffix("/v1") + "/metrics"
    text = httpx.get(url, timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def metric(child: Child, name: str, **labels: str) -> float:
    """One sample (0.0 when absent: counters without events are not exported yet)."""
    return metrics(child).get((name, tuple(sorted(labels.items()))), 0.0)


def transfer_event(child: Child, event: str) -> float:
    return metric(child, "splitwise_transfer_events_total", event=event)


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    """Poll ``predicate`` until it holds or the deadline passes (never asserts on speed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def log_text(child: Child) -> str:
    return child.log_file.read_text(errors="replace")


def decode_with_running_request(cluster: LocalCluster) -> Child | None:
    for child in cluster.children:
        if (
            child.role == "decode"
            and child.process.poll() is None
            and metric(child, "splitwise_num_requests_running") > 0
        ):
            return child
    return None


@dataclass
class StreamedCompletion:
    text: str = ""
    num_chunks: int = 0
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    done: bool = False


def stream_completion(
    base_url: str,
    prompt: list[int] | str,
    *,
    max_tokens: int,
    timeout_s: float = 120.0,
    on_chunk: Callable[[StreamedCompletion], bool] | None = None,
) -> StreamedCompletion:
    """A streaming greedy completion. ``on_chunk`` sees the state after each content chunk; when it
    returns False the client closes the connection right there (a cancel)."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = StreamedCompletion()
    with httpx.stream("POST", f"{base_url}/completions", json=body, timeout=timeout_s) as resp:
        assert resp.status_code == 200, resp.read().decode()
        for data in _sse_data(resp.iter_lines()):
            if data == "[DONE]":
                result.done = True
                break
            event = json.loads(data)
            assert "error" not in event, event
            if event.get("usage"):
                result.usage = event["usage"]
            for choice in event.get("choices", []):
                result.text += choice.get("text", "")
                if choice.get("finish_reason"):
                    result.finish_reason = choice["finish_reason"]
                if choice.get("text"):
                    result.num_chunks += 1
                    if on_chunk is not None and not on_chunk(result):
                        return result
    return result


def _sse_data(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()


def make_prompt(num_tokens: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(3, 1000) for _ in range(num_tokens)]


class Background:
    """One blocking client call on a thread; ``result()`` returns its value or re-raises its error."""

    def __init__(self, fn: Callable[..., object], *args: object, **kwargs: object) -> None:
        self._out: list[object] = []
        self._thread = threading.Thread(target=lambda: self._out.append(_call(fn, args, kwargs)), daemon=True)
        self._thread.start()

    def result(self, timeout_s: float = 120.0) -> object:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive() and self._out, "the client call did not return"
        if isinstance(self._out[0], BaseException):
            raise self._out[0]
        return self._out[0]


def _call(fn: Callable[..., object], args: tuple[object, ...], kwargs: dict[str, object]) -> object:
    try:
        return fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - handed to Background.result
        return exc


class Frozen:
    """``with Frozen(child):`` stops an instance with SIGSTOP (a wedged node: its sockets stay open
    and nothing it would send arrives) and continues it on exit. Tests use it to hold a request
    in a state (P never answers) for as long as they need, instead of slowing production code."""

    def __init__(self, child: Child) -> None:
        self.child = child

    def __enter__(self) -> Frozen:
        os.kill(self.child.process.pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.child.process.poll() is None:
            os.kill(self.child.process.pid, signal.SIGCONT)


# Nodes stay "alive" in the registry for the whole test while one is frozen or killed on purpose,
# so the frontend keeps the pair it dispatched to (the scheduler tests cover node expiry).
NEVER_EXPIRE = ["--scheduler-dead-after-missed", "1000"]
