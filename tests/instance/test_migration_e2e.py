"""Live migration D1 -> D2 on real processes (#16): `splitwise serve` instances, a real
redis-server, real sockets, the real HTTP API and the real `splitwise migrate` path (a
MigrateCommand on the decode nodes' control streams).

A long greedy (or seeded) completion starts; once a decode node reports it running, the test asks
for its migration and waits for the request's result. The output must be token for token the one
of the same request without a migration (run first, on the same cluster), and the source decode
node must count the migration as completed (or, when the target is killed mid-copy, as failed with
the request finished on the source).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from scheduler.config import SchedulerConfig
from splitwise.cluster import Child, LocalCluster
from splitwise.commands.inspect import collect
from splitwise.commands.migrate import send
from tests.instance.pd_helpers import Background, decode_with_running_request, make_prompt, metric, wait_until

MAX_TOKENS = 1500  # long enough that the migration (a few ms of copying) happens mid-stream


def _config(cluster: LocalCluster) -> SchedulerConfig:
    host, port = cluster.scheduler_address
    return SchedulerConfig(scheduler_host=host, scheduler_port=port, scheduler_topic=cluster.spec.topic)


def _request(base_url: str, prompt: list[int], request_id: str, sampling: dict[str, Any]) -> dict[str, Any]:
    import httpx

    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True, "logprobs": 1, **sampling}
    resp = httpx.post(f"{base_url}/completions", json=body, headers={"X-Request-Id": request_id}, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def _completed(child: Child) -> float:
    return metric(child, "splitwise_migrations_completed_total", model_name=_model(child), reason="manual")


def _failed(child: Child) -> float:
    return metric(child, "splitwise_migrations_failed_total", model_name=_model(child), reason="manual")


def _model(child: Child) -> str:
    import httpx

    return str(httpx.get(child.base_url + "/models", timeout=10).json()["data"][0]["id"])


def _migrate_while_running(
    cluster: LocalCluster, prompt: list[int], request_id: str, sampling: dict[str, Any]
) -> tuple[dict[str, Any], Child]:
    """Start the request, migrate it once a decode node runs it, return (response, source node)."""
    call = Background(_request, cluster.entry.base_url, prompt, request_id, sampling)
    source: list[Child] = []

    def running() -> bool:
        child = decode_with_running_request(cluster)
        if child is not None:
            source.append(child)
        return child is not None

    assert wait_until(running, 120), "the request never ran on a decode node"
    nodes = asyncio.run(send(_config(cluster), f"cmpl-{request_id}", to=None, source=None))
    assert nodes, "no decode node was asked"
    return call.result(300), source[0]  # type: ignore[return-value]


@pytest.mark.parametrize("transfer", ["ipc", "tcp"])
@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.95, "seed": 1234}],
    ids=["greedy", "seeded"],
)
def test_migration_mid_stream_is_token_exact(
    cluster_factory, transfer: str, sampling: dict[str, Any]
) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(num_prefill=1, num_decode=2, transfer=transfer)
    prompt = make_prompt(37, seed=5)
    want = _request(cluster.entry.base_url, prompt, "reference", sampling)
    decodes = [c for c in cluster.children if c.role == "decode"]
    request_id = ""
    for attempt in range(3):
        # On a loaded machine the whole stream (a few seconds) may end before the node reads the
        # command: the node then ignores it (nothing to move) and counts nothing. Try a new request.
        request_id = f"migrated{attempt}"
        got, _ = _migrate_while_running(cluster, prompt, request_id, sampling)
        # Counted by the node that ran it (the source) before the stream ended, if it migrated.
        if wait_until(lambda: sum(_completed(c) + _failed(c) for c in decodes) >= 1, 10):
            break
    assert sum(_completed(c) + _failed(c) for c in decodes) >= 1, "no attempt migrated mid-stream"
    [source] = [c for c in decodes if _completed(c) == 1]
    assert sum(_failed(c) for c in decodes) == 0, cluster.log_tail(source, 60)
    choice, ref = got["choices"][0], want["choices"][0]
    assert choice["text"] == ref["text"]
    assert got["usage"]["completion_tokens"] == MAX_TOKENS
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(ref["logprobs"]["token_logprobs"], abs=1e-4)
    # The request's record (`splitwise inspect --request`) shows the move from the source to the other.
    [target] = [c for c in decodes if c is not source]
    report: dict[str, Any] = {}

    def recorded() -> bool:
        report.update(
            asyncio.run(collect(_config(cluster), req_id=f"cmpl-{request_id}", dead_letter_limit=0))
        )
        return bool(report.get("request")) and report["request"]["state"]["state"] == "finished"

    assert wait_until(recorded, 60)
    names = [(e["event"], e["node"]) for e in report["request"]["events"]]
    assert ("migrated_out", source.name) in names and ("migrated_in", target.name) in names
    assert (
        report["request"]["state"]["decode"] == target.name
        and report["request"]["state"]["migrations"] == "1"
    )
    others = [c for c in cluster.children if c.role == "decode" and c is not source]
    assert sum(c.log_file.read_text().count("migration reservation released") for c in others) == 0
