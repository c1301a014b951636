"""What is public with --api-key (issue #13, item 8), and the Redis password kept out of the process
list (--scheduler-password-file). Real HTTP server (uvicorn on a loopback port)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_support import LocalStack, start_local_stack
from click.testing import CliRunner

from scheduler.config import SchedulerConfig
from splitwise.engine.tokenizer import Tokenizer

API_KEY = "sk-exposure-key"


@pytest.fixture(scope="module")
def keyed(tokenizer: Tokenizer) -> Iterator[LocalStack]:
    stack = start_local_stack(tokenizer, api_key=API_KEY)
    yield stack
    stack.server.stop()


def test_with_an_api_key_only_probes_are_public(keyed: LocalStack, local_stack: LocalStack) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(keyed.base_url + path, timeout=20).status_code == 404, path
        assert httpx.get(local_stack.base_url + path, timeout=20).status_code == 200, path  # no key: open
    for path in ("/health", "/ping", "/version", "/metrics"):
        assert httpx.get(keyed.base_url + path, timeout=20).status_code == 200, path
    for method, path in (("GET", "/v1/models"), ("POST", "/tokenize"), ("POST", "/detokenize")):
        resp = httpx.request(method, keyed.base_url + path, json={"prompt": "x", "tokens": [1]}, timeout=20)
        assert resp.status_code == 401, (path, resp.text)


def test_scheduler_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text("s3cret\n")
    config = SchedulerConfig.from_options({"scheduler_password_file": str(secret)})
    assert config.scheduler_password == "s3cret"
    with pytest.raises(ValueError, match="--scheduler-password-file: give either"):
        SchedulerConfig.from_options({"scheduler_password_file": str(secret), "scheduler_password": "x"})
    with pytest.raises(ValueError, match="--scheduler-password-file: cannot read"):
        SchedulerConfig.from_options({"scheduler_password_file": str(tmp_path / "missing")})


def test_help_says_how_to_keep_the_password_out_of_the_process_list() -> None:
    from splitwise.cli import cli

    result = CliRunner().invoke(cli, ["inspect", "--help"], terminal_width=200)
    text = " ".join(result.output.split())
    assert "--scheduler-password-file" in text and "visible in the process list" in text
