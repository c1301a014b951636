"""Helpers for instance tests: start local clusters, send completions."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from splitwise.cluster import ClusterSpec, LocalCluster

# Small blocks and a small step budget so short prompts already span many blocks and chunks.
ENGINE_ARGS = [
    "--block-size",
    "4",
    "--max-num-batched-tokens",
    "32",
    "--num-kv-blocks",
    "512",
    "--transfer-timeout",
    "20",
]


# The hand-off tests want every request handed off, however short (conditional disaggregation off).
ALWAYS_DISAGG = ["--disagg-min-prefill-tokens", "0"]


def has_failed(request: pytest.FixtureRequest) -> bool:
    """True when the test that ``request`` belongs to failed in its setup or body (the reports
    tests/conftest.py's ``pytest_runtest_makereport`` keeps on the item)."""
    reports = (getattr(request.node, f"rep_{when}", None) for when in ("setup", "call"))
    return any(getattr(report, "failed", False) for report in reports)


def start_cluster(model: Path, *, extra: list[str] | None = None, **spec: object) -> LocalCluster:
    spec.setdefault("scheduler_args", ALWAYS_DISAGG)
    cluster = LocalCluster(
        ClusterSpec(model=str(model), extra_args=ENGINE_ARGS + (extra or []), threads_per_instance=1, **spec)
    )  # type: ignore[arg-type]
    try:
        cluster.start()
        cluster.wait_ready(timeout_s=180)
    except BaseException:
        kept = cluster.stop(keep_logs=True)  # why it did not come up is in the instances' logs
        print(f"cluster logs kept in {kept}")
        raise
    return cluster


def complete(
    base_url: str, prompt: list[int] | str, *, max_tokens: int = 8, timeout: float = 60.0, **extra: object
) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "logprobs": 1,
        **extra,
    }
    resp = httpx.post(f"{base_url}/completions", json=body, timeout=timeout)
    assert resp.status_code == 200, resp.text
    return resp.json()
