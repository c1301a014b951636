"""Child processes of bench/scheduler_dispatch.py (a script's helpers, not a test): the reference
implementation's extraction, the children (node hosts and drivers re-run that script with a mode
flag), and the paired phases that keep two node populations live at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().with_name("scheduler_dispatch.py")
IMPL_ENV = "SPLITWISE_BENCH_IMPL_DIR"  # set in children: where `scheduler` is imported from
NODES_PER_PROCESS = 64


def extract_reference(commit: str, into: Path) -> Path:
    """The ``scheduler`` package as it was at ``commit`` (git archive), under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "scheduler"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def child(
    impl_dir: Path | None,
    *args: str,
    stdout: Any = subprocess.PIPE,
    stderr: Any = subprocess.DEVNULL,
    stdin: Any = None,
) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop(IMPL_ENV, None)
    if impl_dir is not None:
        env[IMPL_ENV] = str(impl_dir)
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args], stdout=stdout, stderr=stderr, stdin=stdin, text=True, env=env
    )


def start_hosts(hosts: list[subprocess.Popen[str]], impl: Path | None, port: int, topic: str, n: int) -> None:
    """Node hosts for ``n`` simulated nodes on ``topic`` (NODES_PER_PROCESS each), appended to
    ``hosts`` as they start (so the caller's ``stop_hosts`` stops them all), each awaited READY."""
    first_new = len(hosts)
    for first in range(0, n, NODES_PER_PROCESS):
        count = min(NODES_PER_PROCESS, n - first)
        hosts.append(child(impl, "--serve", str(port), topic, str(first), str(count), str(n)))
    for host in hosts[first_new:]:
        assert host.stdout is not None
        line = host.stdout.readline().strip()
        if line != "READY":
            raise RuntimeError(f"node host did not start ({line!r})")


def stop_hosts(hosts: list[subprocess.Popen[str]]) -> None:
    for host in hosts:
        host.send_signal(signal.SIGTERM)
    for host in hosts:
        try:
            host.wait(timeout=60)
        except subprocess.TimeoutExpired:
            host.kill()
            host.wait()


def run_paired_throughput(
    impls: dict[str, Path | None], port: int, n: int, bursts: int, burst_s: float, inflight: int, tag: str
) -> list[dict[str, float]]:
    """Both implementations' nodes and frontends live at once; throughput bursts alternate between
    them (old, new, then new, old, ...), so every ratio compares two neighbouring moments."""
    hosts: list[subprocess.Popen[str]] = []
    drivers: dict[str, subprocess.Popen[str]] = {}
    try:
        for name, impl in impls.items():
            start_hosts(hosts, impl, port, f"bburst{name}{n}{tag}", n)
        for name, impl in impls.items():
            args = [str(port), f"bburst{name}{n}{tag}", str(n), str(burst_s), str(inflight)]
            env_child = child(impl, "--bursts", *args, stdin=subprocess.PIPE)
            drivers[name] = env_child
        for driver in drivers.values():
            assert driver.stdout is not None
            if driver.stdout.readline().strip() != "READY":
                raise RuntimeError("burst driver did not start")
        out: list[dict[str, float]] = []
        for i in range(bursts):
            got: dict[str, float] = {}
            for name in ("old", "new") if i % 2 == 0 else ("new", "old"):
                driver = drivers[name]
                assert driver.stdin is not None and driver.stdout is not None
                driver.stdin.write("go\n")
                driver.stdin.flush()
                got[name] = float(json.loads(driver.stdout.readline())["dispatch_s"])
            got["load_avg"] = os.getloadavg()[0]
            out.append(got)
        return out
    finally:
        for driver in drivers.values():
            try:
                assert driver.stdin is not None
                driver.stdin.write("stop\n")
                driver.stdin.close()
                driver.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                driver.kill()
                driver.wait()
        stop_hosts(hosts)


def run_pair(port: int, sizes: list[int], samples: int, tag: str) -> dict[str, float]:
    """Hosts for every size at once (this checkout), then the paired driver."""
    hosts: list[subprocess.Popen[str]] = []
    topics = [f"bpair{n}{tag}" for n in sizes]
    try:
        for topic, n in zip(topics, sizes, strict=True):
            start_hosts(hosts, None, port, topic, n)
        args = [str(port), ",".join(topics), ",".join(map(str, sizes)), str(samples)]
        driver = child(None, "--pair", *args, stderr=subprocess.PIPE)
        out, err = driver.communicate(timeout=600)
        lines = out.strip().splitlines()
        if driver.returncode != 0 or not lines:
            raise RuntimeError(f"pair driver failed ({driver.returncode}): {err[-2000:]}")
        return dict(json.loads(lines[-1]))
    finally:
        stop_hosts(hosts)
