"""Role switching on real processes: under streaming load through the router, one decode node of a
1P2D cluster becomes a prefill node and then a decode node again, in the same process with the
same engine (pid and ``engine_loads`` unchanged); zero failed requests, every output the greedy
reference, and in each role the node really serves (prefills shipped as P, remote prefills landed
as D)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from splitwise.cluster import Child, LocalCluster
from splitwise.testing.rolling import StreamingLoad
from tests.instance.pd_helpers import log_text, make_prompt, metric, wait_until
from tests.instance.test_drain_rolling import MAX_TOKENS, big_cluster, references  # noqa: F401 (fixture)


def cli(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    host, port = cluster.scheduler_address
    scheduler = [
        "--scheduler-host",
        host,
        "--scheduler-port",
        str(port),
        "--scheduler-topic",
        cluster.spec.topic,
    ]
    return subprocess.run(
        [sys.executable, "-m", "splitwise.cli", *args, *scheduler],
        capture_output=True,
        text=True,
        timeout=400,
    )


def node_row(cluster: LocalCluster, node_id: str) -> dict[str, object]:
    out = cli(cluster, "inspect", "--json")
    [row] = [n for n in json.loads(out.stdout)["nodes"] if n["node_id"] == node_id]
    return row  # type: ignore[no-any-return]


def events(child: Child, name: str) -> float:
    return metric(child, "splitwise_transfer_events_total", event=name)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_decode_becomes_prefill_and_back_under_load_in_the_same_process(
    big_cluster: Callable[..., LocalCluster],  # noqa: F811 (the fixture imported above)
    tiny_model: Path,
) -> None:
    cluster = big_cluster(num_prefill=1, num_decode=2, router=True, transfer="ipc", extra=[])
    [switcher] = [c for c in cluster.children if c.name == "decode-1"]
    pid = switcher.process.pid
    prompts = [make_prompt(24 + 4 * i, seed=200 + i) for i in range(6)]
    want = references(tiny_model, prompts)
    load = StreamingLoad(cluster.entry.base_url, prompts, want, max_tokens=MAX_TOKENS, num_clients=3).start()
    try:
        assert wait_until(lambda: load.counts.ok >= 3, 120)
        to_prefill = cli(cluster, "role", "decode-1", "prefill", "--reason", "test: prompt-heavy", "--wait")
        assert to_prefill.returncode == 0, to_prefill.stderr
        row = node_row(cluster, "decode-1")
        assert row["role"] == "prefill" and row["state"] == "serving" and row["alive"]
        # It serves as a prefill node: the router's requests get prefilled there too.
        assert wait_until(lambda: "prefill shipped" in log_text(switcher), 120), cluster.log_tail(switcher)
        ok_as_prefill = load.counts.ok
        to_decode = cli(cluster, "role", "decode-1", "decode", "--reason", "test: output-heavy", "--wait")
        assert to_decode.returncode == 0, to_decode.stderr
        assert node_row(cluster, "decode-1")["role"] == "decode"
        landed_before = log_text(switcher).count("remote prefill landed")
        assert wait_until(lambda: log_text(switcher).count("remote prefill landed") > landed_before, 120)
        assert wait_until(lambda: load.counts.ok > ok_as_prefill + 3, 120)
    finally:
        counts = load.stop()
    assert counts.failed == 0 and counts.mismatched == 0, counts.errors
    # The same process and the same engine: nothing was restarted or loaded again.
    assert switcher.process.poll() is None and switcher.process.pid == pid
    assert events(switcher, "engine_loads") == 1
    assert events(switcher, "role_switches") == 2
    text = log_text(switcher)
    engine_ids = {json.loads(line)["engine_id"] for line in text.splitlines() if '"role switched"' in line}
    assert len(engine_ids) == 1, engine_ids
    assert text.count('"state": "switching"') == 2  # each switch drained first
