"""Every error case answers in OpenAI's error shape with its status code -- never a 500 for bad input,
never a hang -- and is counted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from api_support import MAX_MODEL_LEN, MODEL_ID, TTL_S, LocalStack, start_local_stack, wait_until

from splitwise.engine.tokenizer import Tokenizer

API_KEY = "sk-test-key"
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def post(stack: LocalStack, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(stack.base_url + path, json=body, timeout=20, **kwargs)


def assert_error(
    resp: httpx.Response, status: int, *, param: str | None = None, code: str | None = None
) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": -3}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "five"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
        ({"prompt": "x", "temperature": True}, "temperature"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_k": -2}, "top_k"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "stop": 7}, "stop"),
        ({"prompt": "x", "seed": "abc"}, "seed"),
        ({"prompt": "x", "seed": 2**70}, "seed"),
        ({"prompt": "x", "top_k": 2**40}, "top_k"),
        ({"prompt": "x", "stop_token_ids": [2**40]}, "stop_token_ids[0]"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"prompt": "x", "n": 17}, "n"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "use_beam_search": True}, "use_beam_search"),
        ({"prompt": "x", "suffix": "tail"}, "suffix"),
        ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
        ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "x", "min_p": 1.5}, "min_p"),
        ({"prompt": "x", "min_tokens": 20, "max_tokens": 5}, "min_tokens"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [""]}, "prompt"),
        ({"prompt": ["ok", ""]}, "prompt[1]"),
        ({"prompt": "x", "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
            "response_format.json_schema",
        ),
        (
            {
                "prompt": "x",
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": {"type": "nonsense"}},
                },
            },
            "response_format.json_schema.schema",
        ),
        ({"prompt": "x", "guided_regex": "([a"}, "guided_regex"),
        ({"prompt": "x", "guided_json": "{not json"}, "guided_json"),
        ({"prompt": "x", "guided_choice": []}, "guided_choice"),
        ({"prompt": "x", "guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
        ({"prompt": "x", "structured_outputs": {"regex": "([a"}}, "structured_outputs.regex"),
        ({"prompt": "x", "prompt_logprobs": 2}, "prompt_logprobs"),
        ({"prompt": "x", "logprobs": 99}, "logprobs"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": [1, 99999]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
    ],
)
def test_bad_completion_parameters_are_400(local_stack: LocalStack, body: dict, param: str) -> None:
    assert_error(post(local_stack, "/v1/completions", body), 400, param=param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user", "content": {"a": 1}}]}, "messages"),
        ({"messages": [{"content": "hi"}]}, "messages"),
        ({"messages": [1]}, "messages[0]"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}, "logprobs"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
            "max_completion_tokens",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "x"}]}, "tools[0]"),
        ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "tools": [TOOL], "tool_choice": "auto"},
            "tool_choice",
        ),
        (
            {
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [TOOL],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "tool_choice",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True},
            "continue_final_message",
        ),
        (
            {
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [TOOL],
                "tool_choice": "required",
                "guided_regex": "a+",
            },
            "guided_regex",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {}}, "stream_options"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}},
            "response_format.json_schema",
        ),
    ],
)
def test_bad_chat_parameters_are_400(local_stack: LocalStack, body: dict, param: str) -> None:
    assert_error(post(local_stack, "/v1/chat/completions", body), 400, param=param)


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/v1/completions", b'{"prompt": "a\\ud800b"}', "prompt"),
        ("/v1/completions", b'{"prompt": ["ok", "\\ud800"]}', "prompt[1]"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
            "messages[0].content",
        ),
        ("/tokenize", b'{"prompt": "\\udfff"}', "prompt"),
    ],
)
def test_lone_surrogate_is_400_not_500(local_stack: LocalStack, path: str, raw: bytes, param: str) -> None:
    resp = httpx.post(
        local_stack.base_url + path, content=raw, timeout=20, headers={"Content-Type": "application/json"}
    )
    assert_error(resp, 400, param=param)


def test_malformed_json_is_400(local_stack: LocalStack) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        resp = httpx.post(
            local_stack.base_url + path,
            content=b'{"prompt": "x",',
            timeout=20,
            headers={"Content-Type": "application/json"},
        )
        assert_error(resp, 400, code="invalid_json")
        resp = httpx.post(
            local_stack.base_url + path,
            content=b"[1, 2]",
            timeout=20,
            headers={"Content-Type": "application/json"},
        )
        assert_error(resp, 400)
        resp = httpx.post(
            local_stack.base_url + path, content=b"prompt=x", timeout=20
        )  # no JSON content type
        assert_error(resp, 400)


def test_prompt_longer_than_context_is_400(local_stack: LocalStack) -> None:
    error = assert_error(
        post(local_stack, "/v1/completions", {"prompt": [5] * MAX_MODEL_LEN}),
        400,
        param="prompt",
        code="context_length_exceeded",
    )
    assert str(MAX_MODEL_LEN) in error["message"]


def test_prompt_plus_max_tokens_beyond_context_is_400(local_stack: LocalStack) -> None:
    body = {"prompt": [5] * (MAX_MODEL_LEN - 10), "max_tokens": 11}
    assert_error(
        post(local_stack, "/v1/completions", body), 400, param="max_tokens", code="context_length_exceeded"
    )
    body["max_tokens"] = 10  # exactly fills the context: accepted
    assert post(local_stack, "/v1/completions", body).status_code == 200


def test_long_chat_is_400(local_stack: LocalStack) -> None:
    body = {"messages": [{"role": "user", "content": "word " * MAX_MODEL_LEN}]}
    assert_error(
        post(local_stack, "/v1/chat/completions", body), 400, param="messages", code="context_length_exceeded"
    )


def test_unknown_model_is_404(local_stack: LocalStack) -> None:
    client = openai.OpenAI(base_url=local_stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=20)
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="x")
    assert info.value.status_code == 404
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"  # type: ignore


def test_unknown_route_is_404_in_openai_shape(local_stack: LocalStack) -> None:
    assert_error(httpx.get(local_stack.base_url + "/v1/nothing-here", timeout=20), 404)
    assert_error(httpx.get(local_stack.base_url + "/v1/completions", timeout=20), 405)


def test_unknown_fields_are_ignored(local_stack: LocalStack) -> None:
    resp = post(local_stack, "/v1/completions", {"prompt": "x", "max_tokens": 1, "frobnicate": {"a": 1}})
    assert resp.status_code == 200


def test_expired_request_is_504(local_stack: LocalStack) -> None:
    for stream in (False, True):
        resp = post(
            local_stack,
            "/v1/completions",
            {"prompt": "[hang]", "stream": stream},
        )
        assert_error(resp, 504, code="request_expired")
    assert resp.elapsed.total_seconds() < TTL_S + 5


def test_node_failures(local_stack: LocalStack) -> None:
    assert_error(post(local_stack, "/v1/completions", {"prompt": "[fail]"}), 500, code="engine_error")
    assert_error(post(local_stack, "/v1/completions", {"prompt": "[fail-retry]"}), 503, code="engine_error")
    resp = post(
        local_stack,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "[fail]"}], "stream": True},
    )
    assert_error(resp, 500, code="engine_error")  # before the first token: still a real status


@pytest.fixture(scope="module")
def keyed_stack(tokenizer: Tokenizer) -> Iterator[LocalStack]:
    stack = start_local_stack(tokenizer, api_key=API_KEY)
    yield stack
    stack.server.stop()


def test_wrong_or_missing_api_key_is_401(keyed_stack: LocalStack) -> None:
    wrong = openai.OpenAI(
        base_url=keyed_stack.base_url + "/v1", api_key="sk-wrong", max_retries=0, timeout=20
    )
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.completions.create(model=MODEL_ID, prompt="x", max_tokens=1)
    assert info.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert_error(
        post(keyed_stack, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        401,
        code="invalid_api_key",
    )
    right = openai.OpenAI(base_url=keyed_stack.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=20)
    assert (
        right.completions.create(model=MODEL_ID, prompt="x", max_tokens=1).choices[0].finish_reason
        == "length"
    )
    assert httpx.get(keyed_stack.base_url + "/health", timeout=20).status_code == 200  # probes need no key
    assert keyed_stack.backend.submitted and all(r.prompt_token_ids for r in keyed_stack.backend.submitted)
    assert len(keyed_stack.backend.submitted) == 1  # the rejected requests never reached the backend


@pytest.fixture(scope="module")
def empty_stack(tokenizer: Tokenizer) -> Iterator[LocalStack]:
    stack = start_local_stack(tokenizer, with_node=False)
    yield stack
    stack.server.stop()


def test_no_capacity_is_503(empty_stack: LocalStack) -> None:
    client = openai.OpenAI(base_url=empty_stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=20)
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=MODEL_ID, prompt="x")
    assert info.value.status_code == 503
    assert info.value.body["code"] == "no_capacity"  # type: ignore[index]
    resp = post(
        empty_stack, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True}
    )
    assert_error(resp, 503, code="no_capacity")


def test_failure_mid_stream_is_an_error_event_then_done(local_stack: LocalStack) -> None:
    before = (
        local_stack.metrics.registry.get_sample_value(
            "splitwise_requests_total", {"endpoint": "/v1/completions", "outcome": "failed"}
        )
        or 0.0
    )
    body = {"model": MODEL_ID, "prompt": "[fail-late]", "max_tokens": 10, "stream": True}
    with httpx.stream("POST", local_stack.base_url + "/v1/completions", json=body, timeout=20) as resp:
        assert resp.status_code == 200  # the headers went out with the first token
        events = [line[len("data: ") :] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_error" and error["type"] == "internal_error"
    assert len(events) == 2 + 1 + 1  # two tokens, the error, [DONE]
    wait_until(
        lambda: (
            local_stack.metrics.registry.get_sample_value(
                "splitwise_requests_total", {"endpoint": "/v1/completions", "outcome": "failed"}
            )
            == before + 1
        ),
        what="the failure counted",
    )


def test_request_id_header_is_checked_used_and_echoed(local_stack: LocalStack) -> None:
    resp = post(
        local_stack, "/v1/completions", {"prompt": "x", "max_tokens": 2}, headers={"X-Request-Id": "r-1.a:b"}
    )
    assert resp.status_code == 200 and resp.json()["id"] == "cmpl-r-1.a:b"
    assert resp.headers["x-request-id"] == "r-1.a:b"
    assert local_stack.backend.submitted[-1].req_id == "cmpl-r-1.a:b"
    bad = post(local_stack, "/v1/completions", {"prompt": "x"}, headers={"X-Request-Id": "has space"})
    assert_error(bad, 400, param="X-Request-Id")
    assert bad.headers["x-request-id"] == "has space"  # echoed on errors too
    plain = post(local_stack, "/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert plain.status_code == 200 and "x-request-id" not in plain.headers


def test_n_choices_are_separate_requests_started_after_the_first_token(local_stack: LocalStack) -> None:
    resp = post(local_stack, "/v1/completions", {"prompt": "x", "max_tokens": 2, "n": 3, "seed": 5})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["prompt_tokens"] == len(local_stack.backend.submitted[-1].prompt_token_ids)
    subs = local_stack.backend.submitted[-3:]
    assert [s.req_id for s in subs] == [f"{body['id']}-{i}" for i in range(3)]
    assert [s.sampling_params.seed for s in subs] == [5, 6, 7]


def test_sibling_choices_wait_for_the_first_token(local_stack: LocalStack) -> None:
    """A lead choice that never produces a token keeps its siblings unsubmitted (they would prefill
    the prompt again instead of finding it in the prefix cache)."""
    before = len(local_stack.backend.submitted)
    resp = post(local_stack, "/v1/completions", {"prompt": "[hang]", "max_tokens": 2, "n": 2})
    assert_error(resp, 504)
    assert len(local_stack.backend.submitted) == before + 1
