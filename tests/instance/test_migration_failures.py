"""Live migration failures on real processes (#16): the target dies during the migration (the
request keeps running on the source and finishes correct), the source dies during it (the request
is re-dispatched as today and finishes correct; the target releases the reservation it made).

The order is decided by signals, never by sleeps: the target is stopped (SIGSTOP) before the
migration is asked for, so the migration is held right after it began (the source waits for the
target's answer to its offer); the test sees it began in the source's own events
(``migrations_started``) and then kills whichever side it is about. Which copy-round and commit
orderings go wrong where is covered step by step on fakes (test_migration_states.py).

Requests go through the prefill node's frontend: it survives every kill here.
"""

from __future__ import annotations

import asyncio
import os
import signal

from splitwise.cluster import Child, LocalCluster
from splitwise.commands.migrate import send
from tests.instance.pd_helpers import Background, make_prompt, metric, transfer_event, wait_until
from tests.instance.test_migration_e2e import MAX_TOKENS, _config, _failed, _request


def _by_role(cluster: LocalCluster, role: str) -> list[Child]:
    return [c for c in cluster.children if c.role == role]


def _running_on(decodes: list[Child], req_id: str) -> Child | None:
    """The decode node that admitted ``req_id`` (its KV landed there: it decodes it now)."""
    for child in decodes:
        for line in child.log_file.read_text(errors="replace").splitlines():
            if "remote prefill landed" in line and f'"req_id": "{req_id}"' in line:
                return child
    return None


def _start_held_migration(
    cluster: LocalCluster, request_id: str
) -> tuple[Background, Child, Child, dict[str, object]]:
    """A long greedy request runs on a decode node (the source); the other one (the target) is
    stopped, then asked to take the request: returns once the source began the migration."""
    [p] = _by_role(cluster, "prefill")
    decodes = _by_role(cluster, "decode")
    prompt = make_prompt(41, seed=9)
    want = _request(p.base_url, prompt, f"{request_id}-reference", {"temperature": 0.0})
    call = Background(_request, p.base_url, prompt, request_id, {"temperature": 0.0})
    assert wait_until(lambda: _running_on(decodes, f"cmpl-{request_id}") is not None, 120)
    source = _running_on(decodes, f"cmpl-{request_id}")
    assert source is not None
    [target] = [c for c in decodes if c is not source]
    os.kill(target.process.pid, signal.SIGSTOP)
    asyncio.run(send(_config(cluster), f"cmpl-{request_id}", to=target.name, source=source.name))
    assert wait_until(lambda: transfer_event(source, "migrations_started") >= 1, 60), cluster.log_tail(source)
    return call, source, target, want


def test_target_dying_mid_migration_leaves_the_request_on_the_source(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(num_prefill=1, num_decode=2, transfer="ipc")
    call, source, target, want = _start_held_migration(cluster, "target-dies")
    cluster.kill(target)
    got = call.result(300)
    assert got["choices"][0]["text"] == want["choices"][0]["text"]  # type: ignore[index]
    assert got["usage"]["completion_tokens"] == MAX_TOKENS  # type: ignore[index]
    assert wait_until(lambda: _failed(source) == 1, 60), cluster.log_tail(source, 40)
    assert "migration failed; the request stays here" in source.log_file.read_text()


def test_source_dying_mid_migration_redispatches_and_the_target_releases(cluster_factory) -> None:  # type: ignore[no-untyped-def]
    cluster = cluster_factory(
        num_prefill=1, num_decode=2, transfer="ipc", extra=["--scheduler-heartbeat-interval", "0.5"]
    )
    [p] = _by_role(cluster, "prefill")
    call, source, target, want = _start_held_migration(cluster, "source-dies")
    cluster.kill(source)
    os.kill(target.process.pid, signal.SIGCONT)
    got = call.result(300)
    assert got["choices"][0]["text"] == want["choices"][0]["text"]  # type: ignore[index]
    assert got["usage"]["completion_tokens"] == MAX_TOKENS  # type: ignore[index]
    assert metric(p, "splitwise_scheduler_frontend_events_total", event="redispatched") == 1
    # Whatever of the offer reached the target (a reservation, fenced and released once the
    # source's connection dropped; or nothing, the source died in the handshake), none is left.
    assert wait_until(
        lambda: (
            transfer_event(target, "migrations_reserved") == transfer_event(target, "migrations_released")
        ),
        60,
    ), cluster.log_tail(target, 40)
    assert transfer_event(target, "reservations_quarantined") == 0
