"""Abort/cancel at any stage frees KV blocks on both sides (no block leaks).

A real 1P1D cluster, smoke-testing the cancel plumbing (client hang-up -> frontend -> Redis -> D
and P -> blocks freed); every cancel race of the hand-off itself is tested deterministically in
test_handoff_decode.py / test_handoff_prefill.py. Streaming requests are cancelled by closing the
client connection at three points: before D admitted the request (P is frozen with SIGSTOP, so the
request is held waiting for P's answer until the cancel has landed), after the first token, and
mid-stream (long decodes: ~1000 steps against one chunk's delivery); others complete normally.
Afterwards every instance's /metrics shows no KV block in use and nothing running, the cancels were
counted as cancels, and D did not "fall back" to prefilling a cancelled request.
"""

from __future__ import annotations

import json
import socket

import httpx

from splitwise.cluster import LocalCluster
from tests.instance.pd_helpers import (
    NEVER_EXPIRE,
    Background,
    Frozen,
    StreamedCompletion,
    log_text,
    make_prompt,
    metric,
    stream_completion,
    transfer_event,
    wait_until,
)


def close_after(num_chunks: int):  # type: ignore[no-untyped-def]
    def on_chunk(state: StreamedCompletion) -> bool:
        return state.num_chunks < num_chunks

    return on_chunk


def wait_quiet(cluster: LocalCluster, child_name: str) -> bool:
    child = next(c for c in cluster.children if c.name == child_name)
    return wait_until(
        lambda: (
            metric(child, "splitwise_kv_blocks_used") == 0
            and metric(child, "splitwise_num_requests_running") == 0
        ),
        30,
        0.25,
    )


def stream_body(prompt: list[int], max_tokens: int) -> dict:
    return {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
    }


def test_cancel_at_every_stage_frees_blocks_on_both_sides(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(num_prefill=1, num_decode=1, transfer="ipc", extra=NEVER_EXPIRE)
    p = next(c for c in cluster.children if c.role == "prefill")
    d = next(c for c in cluster.children if c.role == "decode")
    entry = p.base_url  # the frontend on P; cancels travel through Redis to both nodes
    warm = stream_completion(entry, make_prompt(6, seed=9), max_tokens=2)  # opens D's connection to P
    assert warm.done and wait_quiet(cluster, d.name)

    # 1. Closed before D admitted it: P is frozen, so D holds the reservation waiting for P.
    with Frozen(p):
        sock = open_raw_stream(d.base_url, stream_body(make_prompt(70, seed=1), 32))
        try:
            assert wait_until(lambda: metric(d, "splitwise_kv_blocks_used") > 0, 60, 0.05), cluster.log_tail(
                d
            )
        finally:
            sock.close()
        assert wait_until(lambda: "request cancelled before decoding" in log_text(d), 30), cluster.log_tail(
            d, 60
        )
    # 2. Closed after the first token arrived.
    got = stream_completion(entry, make_prompt(50, seed=2), max_tokens=1000, on_chunk=close_after(1))
    assert got.num_chunks == 1 and not got.done
    # 3. Closed mid-stream.
    got = stream_completion(entry, make_prompt(30, seed=3), max_tokens=1000, on_chunk=close_after(5))
    assert got.num_chunks == 5 and not got.done
    # 4. Completed normally, streaming and not, through both frontends.
    done = stream_completion(entry, make_prompt(20, seed=4), max_tokens=8)
    assert done.done and done.usage["completion_tokens"] == 8
    resp = httpx.post(
        f"{d.base_url}/completions",
        json={"prompt": make_prompt(9, seed=5), "max_tokens": 6, "temperature": 0.0, "ignore_eos": True},
        timeout=60,
    )
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 6

    for child in cluster.children:
        assert wait_quiet(cluster, child.name), (
            f"{child.name}: {metric(child, 'splitwise_kv_blocks_used')} KV blocks still used, "
            f"{metric(child, 'splitwise_num_requests_running')} running\n" + cluster.log_tail(child)
        )
    cancelled = {"endpoint": "/v1/completions", "outcome": "cancelled"}
    assert wait_until(lambda: metric(p, "splitwise_requests_total", **cancelled) == 2, 10), cluster.log_tail(
        p
    )
    assert wait_until(lambda: metric(d, "splitwise_requests_total", **cancelled) == 1, 10), cluster.log_tail(
        d
    )
    # Each cancel reached D; a cancel is not a failed prefill: nothing fell back to a local prefill.
    assert log_text(d).count("request cancelled by frontend") == 3, cluster.log_tail(d)
    assert transfer_event(d, "fallbacks") == 0, cluster.log_tail(d, 60)
    assert cluster.dead_children() == []


def open_raw_stream(base_url: str, body: dict) -> socket.socket:
    """POST a streaming completion on a plain socket and return it unread: the test decides when
    the client hangs up."""
    url = httpx.URL(base_url + "/completions")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((url.host, url.port), timeout=30)
    sock.sendall(
        f"POST {url.raw_path.decode()} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def test_cancel_while_waiting_for_decode_blocks_frees_everything(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    # D has 40 blocks of 4 tokens: the first 100-token request reserves 29 of them (prompt + 16
    # tokens headroom) and holds them while P is frozen, so the second one waits in D's queue.
    cluster = cluster_factory(
        num_prefill=1, num_decode=1, transfer="tcp", extra=["--num-kv-blocks", "40", *NEVER_EXPIRE]
    )
    p = next(c for c in cluster.children if c.role == "prefill")
    d = next(c for c in cluster.children if c.role == "decode")
    warm = stream_completion(d.base_url, make_prompt(6, seed=9), max_tokens=2)  # opens D's connection to P
    assert warm.done and wait_quiet(cluster, d.name)
    with Frozen(p):
        first = Background(stream_completion, d.base_url, make_prompt(100, seed=6), max_tokens=12)
        assert wait_until(lambda: metric(d, "splitwise_kv_blocks_used") > 0, 60, 0.05)
        sock = open_raw_stream(d.base_url, stream_body(make_prompt(100, seed=7), 12))
        try:
            assert wait_until(lambda: metric(d, "splitwise_num_requests_waiting") >= 1, 30, 0.1), (
                cluster.log_tail(d)
            )
        finally:
            sock.close()  # the client hangs up while its request waits for KV blocks on D
        assert wait_until(lambda: "request cancelled before decoding" in log_text(d), 30), cluster.log_tail(
            d, 40
        )

    got = first.result()
    assert isinstance(got, StreamedCompletion) and got.done and got.usage["completion_tokens"] == 12
    for child in cluster.children:
        assert wait_quiet(cluster, child.name), cluster.log_tail(child)
    assert wait_until(lambda: metric(d, "splitwise_num_requests_waiting") == 0, 10)
    # The cancelled request never reached P and was not prefilled anywhere.
    assert transfer_event(d, "transfers_ok") == 2  # the warm-up and the first
    assert transfer_event(d, "fallbacks") == 0
    assert transfer_event(p, "prefills_shipped") == 2
