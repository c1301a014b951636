"""A client that goes away cancels its request in the backend (and through it on the node)."""

from __future__ import annotations

import json

import httpx
import pytest
from api_support import MODEL_ID, LocalStack, wait_until


def _outcome_count(stack: LocalStack, endpoint: str, outcome: str) -> float:
    value = stack.metrics.registry.get_sample_value(
        "splitwise_requests_total", {"endpoint": endpoint, "outcome": outcome}
    )
    return value or 0.0


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_disconnect_mid_stream_cancels(local_stack: LocalStack, path: str) -> None:
    before = _outcome_count(local_stack, path, "cancelled")
    body: dict = {"model": MODEL_ID, "max_tokens": 40, "stream": True}
    if path == "/v1/completions":
        body["prompt"] = "[slow] please"
    else:
        body["messages"] = [{"role": "user", "content": "[slow] please"}]
    req_id = None
    with httpx.stream("POST", local_stack.base_url + path, json=body, timeout=20) as resp:
        assert resp.status_code == 200
        for num_events, line in enumerate(resp.iter_lines()):
            if line.startswith("data: "):
                req_id = json.loads(line[len("data: ") :])["id"]
            if num_events >= 6:
                break  # leaving the block closes the connection mid-stream
    assert req_id is not None
    wait_until(lambda: req_id in local_stack.backend.cancelled, what="backend.cancel(req_id)")
    wait_until(lambda: req_id in local_stack.node.stopped_by_cancel, what="the node to stop generating")
    wait_until(lambda: _outcome_count(local_stack, path, "cancelled") == before + 1, what="cancelled counted")
    assert local_stack.backend.cancelled.count(req_id) == 1


def test_disconnect_while_waiting_for_a_whole_response_cancels(local_stack: LocalStack) -> None:
    submitted_before = len(local_stack.backend.submitted)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            local_stack.base_url + "/v1/completions",
            json={"prompt": "[slow]", "max_tokens": 40},
            timeout=httpx.Timeout(20, read=0.3),
        )
    wait_until(lambda: len(local_stack.backend.submitted) > submitted_before, what="the submit")
    req_id = local_stack.backend.submitted[-1].req_id
    wait_until(lambda: req_id in local_stack.backend.cancelled, what="backend.cancel(req_id)")
    wait_until(lambda: req_id in local_stack.node.stopped_by_cancel, what="the node to stop generating")


def test_finished_stream_is_not_cancelled(local_stack: LocalStack) -> None:
    body = {"model": MODEL_ID, "prompt": "x", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", local_stack.base_url + "/v1/completions", json=body, timeout=20) as resp:
        lines = [line for line in resp.iter_lines() if line]
    req_id = json.loads(lines[0][len("data: ") :])["id"]
    assert lines[-1] == "data: [DONE]"
    assert req_id not in local_stack.backend.cancelled


def test_stop_string_in_stream_ends_it_without_cancel(local_stack: LocalStack) -> None:
    body = {"model": MODEL_ID, "prompt": "x", "max_tokens": 40, "stream": True, "stop": "world"}
    with httpx.stream("POST", local_stack.base_url + "/v1/completions", json=body, timeout=20) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == "Hello "
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["id"] not in local_stack.backend.cancelled
