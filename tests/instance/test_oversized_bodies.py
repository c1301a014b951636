"""Oversized request bodies and prompts (issue #13, item 5), on a real instance: a 10 MB body is a 413
(OpenAI error body) within a second, whether it declares its length or streams it chunked, and a
text prompt longer than max_model_len tokens could ever hold is a 400 before tokenizing; another
stream keeps receiving tokens meanwhile (its inter-token gap stays bounded: the event loop never
parses or tokenizes the oversized input)."""

from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

from tests.instance.pd_helpers import make_prompt

TEN_MB = 10 * 1024 * 1024


def _address(base_url: str) -> tuple[str, int]:
    url = urlparse(base_url)
    return url.hostname or "127.0.0.1", url.port or 80


def _read_status_and_body(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(
        next(
            line.split(b":", 1)[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, json.loads(rest[:length])


def _declared_10mb(base_url: str) -> tuple[float, int, dict]:
    """Headers declaring 10 MB and the first KB of the body: the answer comes without the rest."""
    host, port = _address(base_url)
    with socket.create_connection((host, port), timeout=30) as sock:
        start = time.perf_counter()
        sock.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {TEN_MB}\r\n\r\n".encode()
            + b'{"prompt": "'
            + b"a" * 1024
        )
        status, body = _read_status_and_body(sock)
        return time.perf_counter() - start, status, body


def _chunked_10mb(base_url: str) -> tuple[float, int, dict]:
    """10 MB sent chunked (no Content-Length): cut as soon as it passes the limit."""
    host, port = _address(base_url)
    with socket.create_connection((host, port), timeout=30) as sock:
        start = time.perf_counter()
        sock.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        piece = b"a" * 65536
        stop = threading.Event()

        def upload() -> None:
            try:
                for _ in range(TEN_MB // len(piece)):
                    if stop.is_set():
                        return
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sock.sendall(b"0\r\n\r\n")
            except OSError:
                return  # the server answered and closed: the rest is not wanted

        writer = threading.Thread(target=upload, daemon=True)
        writer.start()
        status, body = _read_status_and_body(sock)
        elapsed = time.perf_counter() - start
        stop.set()
        return elapsed, status, body


class TimedStream:
    """Long greedy streams back to back on a thread (until ``stop``), recording when each chunk arrived."""

    def __init__(self, base_url: str, max_tokens: int) -> None:
        self.times: list[float] = []
        self._stop = threading.Event()
        body = {
            "prompt": make_prompt(8, seed=1),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
        }

        def run() -> None:
            while not self._stop.is_set():
                with httpx.stream("POST", f"{base_url}/completions", json=body, timeout=300) as resp:
                    assert resp.status_code == 200, resp.read()
                    for line in resp.iter_lines():
                        if line.startswith("data:"):
                            self.times.append(time.perf_counter())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(300)

    def max_gap(self, start: float, end: float) -> float:
        """The longest wait between tokens across [start, end], counting from the last token before
        it to the first after it (a window shorter than one token's time still measures its stall)."""
        times = list(self.times)
        points = [t for t in times if t < start][-1:] + [t for t in times if start <= t <= end]
        points += [t for t in times if t > end][:1]
        return max((b - a for a, b in zip(points, points[1:], strict=False)), default=float("inf"))


@pytest.fixture(scope="module")
def instance(tiny_model):  # type: ignore[no-untyped-def]
    from tests.instance.helpers import start_cluster

    cluster = start_cluster(tiny_model, num_prefill=0, num_decode=0, num_mixed=1)
    yield cluster.children[0]
    cluster.stop()


def test_oversized_bodies_are_413_at_once_while_another_stream_flows(instance) -> None:  # type: ignore[no-untyped-def]
    base = instance.base_url.removesuffix("/v1")
    max_model_len = httpx.get(f"{instance.base_url}/models", timeout=30).json()["data"][0]["max_model_len"]
    stream = TimedStream(instance.base_url, max_tokens=min(2000, max_model_len - 16))
    deadline = time.perf_counter() + 60
    while len(stream.times) < 20 and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert len(stream.times) >= 20, "the reference stream did not start"
    before_start = time.perf_counter()
    time.sleep(1.0)  # a window of the stream's normal pace, to compare with
    normal_gap = stream.max_gap(before_start, time.perf_counter())

    start = time.perf_counter()
    declared_s, status, body = _declared_10mb(base)
    chunked_s, chunked_status, chunked_body = _chunked_10mb(base)
    window_end = time.perf_counter()
    time.sleep(0.2)  # let the stream deliver past the window

    assert status == 413 and body["error"]["code"] == "request_too_large", body
    assert (
        body["error"]["type"] == "invalid_request_error" and "--max-request-bytes" in body["error"]["message"]
    )
    assert chunked_status == 413 and chunked_body["error"]["code"] == "request_too_large", chunked_body
    assert declared_s < 1.0, f"413 for a declared 10 MB body took {declared_s:.2f}s"
    assert chunked_s < 5.0, f"413 for a chunked 10 MB body took {chunked_s:.2f}s"
    gap = stream.max_gap(start, window_end)
    print(
        f"413 declared {declared_s * 1000:.0f} ms, chunked {chunked_s * 1000:.0f} ms; "
        f"stream gap {gap * 1000:.0f} ms (normal {normal_gap * 1000:.0f} ms)"
    )
    assert gap < max(0.5, 5 * normal_gap), (gap, normal_gap)
    stream.stop()


def test_text_longer_than_the_context_can_hold_is_400_before_tokenizing(instance) -> None:  # type: ignore[no-untyped-def]
    models = httpx.get(f"{instance.base_url}/models", timeout=30).json()
    max_model_len = models["data"][0]["max_model_len"]
    huge = "word " * (max_model_len * 40)  # within --max-request-bytes, far past the context
    start = time.perf_counter()
    resp = httpx.post(f"{instance.base_url}/completions", json={"prompt": huge, "max_tokens": 1}, timeout=60)
    elapsed = time.perf_counter() - start
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "context_length_exceeded"
    chat = httpx.post(
        f"{instance.base_url}/chat/completions",
        json={"messages": [{"role": "user", "content": huge}], "max_tokens": 1},
        timeout=60,
    )
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "context_length_exceeded", chat.text
    assert elapsed < 5.0
    # a prompt that fits is still served
    ok = httpx.post(
        f"{instance.base_url}/completions", json={"prompt": "hello world", "max_tokens": 2}, timeout=60
    )
    assert ok.status_code == 200, ok.text


def test_a_large_valid_body_is_served_without_stalling_another_stream(instance) -> None:  # type: ignore[no-untyped-def]
    """A ~4 MB body within --max-request-bytes (nested unknown fields, kept as vLLM keeps them) is
    parsed and validated off the event loop: it is answered 200, and the other stream's longest
    token gap meanwhile stays within a bound of its own normal longest gap, measured just before."""
    max_model_len = httpx.get(f"{instance.base_url}/models", timeout=30).json()["data"][0]["max_model_len"]
    stream = TimedStream(instance.base_url, max_tokens=min(2000, max_model_len - 16))
    deadline = time.perf_counter() + 60
    while len(stream.times) < 20 and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert len(stream.times) >= 20, "the reference stream did not start"
    body = {
        "prompt": "hello world",
        "max_tokens": 2,
        "metadata": [{"a": i, "b": [i, str(i)]} for i in range(100_000)],
    }
    raw = json.dumps(body).encode()
    assert 3_000_000 < len(raw) < 8 * 1024 * 1024  # large, within the default --max-request-bytes
    before_start = time.perf_counter()
    time.sleep(1.0)  # a window of the stream's normal pace, to compare with
    normal_gap = stream.max_gap(before_start, time.perf_counter())
    start = time.perf_counter()
    resp = httpx.post(
        f"{instance.base_url}/completions",
        content=raw,
        headers={"Content-Type": "application/json"},
        timeout=120,
    )
    window_end = time.perf_counter()
    time.sleep(0.2)  # let the stream deliver past the window
    gap = stream.max_gap(start, window_end)
    stream.stop()
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 2
    print(
        f"{len(raw) / 1e6:.1f} MB body served in {(window_end - start) * 1000:.0f} ms; "
        f"stream gap {gap * 1000:.0f} ms (normal {normal_gap * 1000:.0f} ms)"
    )
    # Parsed on the loop this body stalled it for the whole parse (~60x the normal gap, measured:
    # 2231 vs 38 ms); on the thread the loop only waits for the GIL between the parser's steps. The
    # second reference: what parsing this body inline costs here, now (the stall it would cause).
    from splitwise.api.body_parse import parse
    from splitwise.api.protocol import CompletionRequest

    inline_start = time.perf_counter()
    parse(raw, "application/json", CompletionRequest)
    inline_s = time.perf_counter() - inline_start
    print(f"inline parse here {inline_s * 1000:.0f} ms")
    # Idle 2-core machine: gap 417 ms against a 559 ms parse (normal gap 8 ms): what still stalls
    # the loop is the work after the parse (the collector's pass over the body's objects and the
    # request's own handling), so the bound is the parse cost itself, not a fraction of it.
    assert gap < 20 * normal_gap or gap < inline_s, (gap, normal_gap, inline_s)
