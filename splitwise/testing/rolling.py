"""A rolling restart under load, for the real-process test and bench/rolling_restart.py.

StreamingLoad(url, prompts, reference): N client threads, each streaming greedy completions of
    the prompts round-robin until stopped; every answer is checked against the reference text
    (an explicit error, a cut stream or a different text counts as a failure)
rolling_restart(cluster): every instance, one at a time: SIGTERM (it drains), wait for exit 0,
    start it again with the same flags, wait until healthy (LocalCluster.restart)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from splitwise.cluster import LocalCluster


@dataclass
class LoadCounts:
    ok: int = 0
    failed: int = 0  # HTTP error, error event or a stream without [DONE]
    mismatched: int = 0  # finished, but not the reference text
    errors: list[str] = field(default_factory=list)  # the first few, for the report

    @property
    def total(self) -> int:
        return self.ok + self.failed + self.mismatched


def stream_text(base_url: str, prompt: list[int], max_tokens: int, timeout_s: float) -> str:
    """One streaming greedy completion's text. Raises RuntimeError on any error or a cut stream."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
    }
    text, done = "", False
    with httpx.stream("POST", f"{base_url}/completions", json=body, timeout=timeout_s) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read().decode(errors='replace')[:200]}")
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']}")
            text += "".join(choice.get("text", "") for choice in event.get("choices", []))
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    return text


class StreamingLoad:
    def __init__(
        self,
        base_url: str,
        prompts: list[list[int]],
        reference: list[str],
        *,
        max_tokens: int,
        num_clients: int = 3,
        timeout_s: float = 300.0,
    ) -> None:
        self.base_url = base_url
        self.prompts = prompts
        self.reference = reference
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.counts = LoadCounts()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), name=f"load-{i}", daemon=True)
            for i in range(num_clients)
        ]

    def start(self) -> StreamingLoad:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> LoadCounts:
        """Let every client finish the request it is in, then return the counts."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 10)
        return self.counts

    def _client(self, index: int) -> None:
        turn = index
        while not self._stop.is_set():
            i = turn % len(self.prompts)
            turn += len(self._threads)
            try:
                text = stream_text(self.base_url, self.prompts[i], self.max_tokens, self.timeout_s)
            except (RuntimeError, httpx.HTTPError) as exc:
                self._count("failed", f"prompt {i}: {exc}")
                continue
            if text == self.reference[i]:
                self._count("ok", "")
            else:
                self._count("mismatched", f"prompt {i}: {text[:40]!r} != {self.reference[i][:40]!r}")

    def _count(self, what: str, error: str) -> None:
        with self._lock:
            setattr(self.counts, what, getattr(self.counts, what) + 1)
            if error and len(self.counts.errors) < 10:
                self.counts.errors.append(error)


@dataclass
class RestartRecord:
    name: str
    seconds: float  # SIGTERM to healthy again
    ok_during: int  # requests that finished correctly while it restarted


def rolling_restart(
    cluster: LocalCluster,
    load: StreamingLoad,
    *,
    roles: tuple[str, ...] = ("prefill", "decode", "mixed"),
    on_restart: Callable[[RestartRecord], None] | None = None,
) -> list[RestartRecord]:
    """Restart every instance of ``roles`` one at a time (the router stays)."""
    records = []
    names = [c.name for c in cluster.children if c.role in roles]
    for name in names:
        [child] = [c for c in cluster.children if c.name == name]
        ok_before, start = load.counts.ok, time.monotonic()
        cluster.restart(child)
        record = RestartRecord(name, round(time.monotonic() - start, 1), load.counts.ok - ok_before)
        records.append(record)
        if on_restart is not None:
            on_restart(record)
    return records
