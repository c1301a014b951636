"""A local cluster as child processes: redis-server plus N prefill and M decode instances.

Used by `splitwise up`, the end-to-end tests and `splitwise bench compare`. Every child is started
with its own ready file; ``wait_ready`` waits for each ready file and a 200 from its /health.
``stop`` stops every child at once (SIGINT, then SIGKILL after a grace period) and removes temp
files, so nothing is left running. ``restart`` replaces one instance the graceful way: SIGTERM
(it drains: splitwise/instance/drain.py), wait for its exit, start it again with the same flags.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from splitwise.errors import SplitwiseError
from splitwise.testing.redis_server import RedisServer


class ClusterError(SplitwiseError):
    pass


@dataclass
class Child:
    name: str
    role: str
    process: subprocess.Popen[bytes]
    ready_file: Path
    log_file: Path
    info: dict[str, object] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)  # its command line (``restart`` runs it again)
    env_extra: dict[str, str] = field(default_factory=dict)
    num_restarts: int = 0

    @property
    def base_url(self) -> str:
        return str(self.info.get("base_url", ""))

    @property
    def http_port(self) -> int:
        return int(str(self.info.get("http_port", 0)))


@dataclass
class ClusterSpec:
    model: str | None = None
    num_prefill: int = 1
    num_decode: int = 1
    num_mixed: int = 0
    # HTTP port of the entry: the router when there is one, else the first decode (or mixed) instance
    port: int = 0
    router: bool = False  # also start a `splitwise router` (the entry, its URL the base URL)
    transfer: str = "ipc"
    scheduler_host: str | None = None
    scheduler_port: int = 6379
    topic: str = "splitwise"
    # Lease of every node and frontend: interval x missed beats (--scheduler-heartbeat-interval/-dead-after-missed).
    heartbeat_interval_s: float = 1.0
    dead_after_missed: int = 3
    threads_per_instance: int | None = None
    # Tensor-parallel size of each role's instances (--prefill-tp / --decode-tp; mixed uses decode's).
    prefill_tp: int = 1
    decode_tp: int = 1
    extra_args: list[str] = field(default_factory=list)  # `serve` flags of every instance
    scheduler_args: list[str] = field(default_factory=list)  # scheduler flags of instances and routers
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_prefill < 0 or self.num_decode < 0 or self.num_mixed < 0:
            raise ValueError("--prefill/--decode: counts must be >= 0")
        if self.num_mixed == 0 and (self.num_prefill < 1 or self.num_decode < 1):
            raise ValueError(
                "--prefill/--decode: a disaggregated cluster needs at least 1 prefill and 1 decode instance"
            )
        if self.transfer not in ("ipc", "tcp", "rdma"):
            raise ValueError(f"--transfer: {self.transfer!r} is not one of ipc, tcp, rdma")
        if self.heartbeat_interval_s <= 0:
            raise ValueError(
                f"--scheduler-heartbeat-interval: must be > 0 seconds, got {self.heartbeat_interval_s}"
            )
        if self.prefill_tp < 1 or self.decode_tp < 1:
            raise ValueError("--prefill-tp/--decode-tp: tensor-parallel sizes must be >= 1")
        if self.dead_after_missed < 1:
            raise ValueError(f"--scheduler-dead-after-missed: must be >= 1, got {self.dead_after_missed}")


class LocalCluster:
    def __init__(self, spec: ClusterSpec, *, log_dir: Path | None = None) -> None:
        self.spec = spec
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="splitwise-cluster-"))
        self._owns_log_dir = log_dir is None  # a temp dir of ours: removed by stop()
        self.redis: RedisServer | None = None
        self.children: list[Child] = []
        self.retired: list[Child] = []  # stopped on purpose (the planner's scale-in): not "dead"
        self._threads = 1

    @property
    def scheduler_address(self) -> tuple[str, int]:
        if self.redis is not None:
            return self.redis.host, self.redis.port
        assert self.spec.scheduler_host is not None
        return self.spec.scheduler_host, self.spec.scheduler_port

    @property
    def entry(self) -> Child:
        """The process whose URL is printed: the router, else the first decode, else the first mixed."""
        for role in ("router", "decode", "mixed", "prefill"):
            for child in self.children:
                if child.role == role:
                    return child
        raise ClusterError("the cluster has no instances")

    def start(self) -> None:
        if self.spec.scheduler_host is None:
            self.redis = RedisServer().start()
        roles = (
            ["prefill"] * self.spec.num_prefill
            + ["decode"] * self.spec.num_decode
            + ["mixed"] * self.spec.num_mixed
        )
        threads = self.spec.threads_per_instance or max(1, (os.cpu_count() or 1) // max(1, len(roles)))
        self._threads = threads
        counts: dict[str, int] = {}
        entry_assigned = self.spec.router
        for role in sorted(roles, key=lambda r: {"decode": 0, "mixed": 1, "prefill": 2}[r]):
            index = counts.get(role, 0)
            counts[role] = index + 1
            port = 0
            if not entry_assigned and role in ("decode", "mixed"):
                port, entry_assigned = self.spec.port, True
            self.children.append(self._spawn(f"{role}-{index}", role, port, threads))
        if self.spec.router:
            self.children.append(self.spawn_router("router-0", self.spec.port))

    # -- the planner's hooks (#16): instances added, retired and switched while the cluster runs ---

    def add_instance(self, role: str) -> Child:
        """Start one more instance of ``role`` (named ``<role>-<next index>``); it registers itself
        when ready (``wait_ready`` is not needed: the planner sees it in Redis)."""
        names = {c.name for c in [*self.children, *self.retired]}
        index = next(i for i in range(len(names) + 1) if f"{role}-{i}" not in names)
        child = self._spawn(f"{role}-{index}", role, 0, self._threads)
        self.children.append(child)
        return child

    def retire_instance(self, name: str) -> None:
        """SIGTERM one instance on purpose (it drains, deregisters and exits); ``stop`` still waits
        for it, ``dead_children`` no longer reports it."""
        child = next((c for c in self.children if c.name == name), None)
        if child is None:
            raise ClusterError(f"no running instance named {name!r}")
        self.children.remove(child)
        self.retired.append(child)
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)

    def set_role(self, name: str, role: str) -> None:
        """Record a role switch done in place (`splitwise role`): the process is the same."""
        for child in self.children:
            if child.name == name:
                child.role = role

    def _scheduler_args(self) -> list[str]:
        host, sport = self.scheduler_address
        return [
            "--scheduler-host",
            host,
            "--scheduler-port",
            str(sport),
            "--scheduler-topic",
            self.spec.topic,
            "--scheduler-heartbeat-interval",
            str(self.spec.heartbeat_interval_s),
            "--scheduler-dead-after-missed",
            str(self.spec.dead_after_missed),
            *self.spec.scheduler_args,
        ]

    def spawn_router(self, name: str, port: int = 0, extra: list[str] | None = None) -> Child:
        """Start one `splitwise router` (more than one may serve a cluster; tests start a second).
        ``extra``: its own flags after the cluster's scheduler flags (the later one wins)."""
        ready = self.log_dir / f"{name}.ready.json"
        args = [sys.executable, "-m", "splitwise.cli", "--log-level", "INFO", "router", "--port", str(port)]
        args += [*self._scheduler_args(), *(extra or []), "--ready-file", str(ready)]
        if self.spec.model:
            args += ["--model", self.spec.model]
        return self._popen(name, "router", args, ready, {})

    def _spawn(self, name: str, role: str, port: int, threads: int) -> Child:
        ready = self.log_dir / f"{name}.ready.json"
        args = [
            sys.executable,
            "-m",
            "splitwise.cli",
            "--log-level",
            "INFO",
            "serve",
            "--splitwise-role",
            role,
            "--port",
            str(port),
            "--node-id",
            name,
            "--scheduler-name",
            "splitwise",
            *self._scheduler_args(),
            "--cache-transfer-protocol",
            _protocols(self.spec.transfer),
            "--torch-threads",
            str(threads),
            "--ready-file",
            str(ready),
        ]
        if self.spec.model:
            args += ["--model", self.spec.model]
        tp = self.spec.prefill_tp if role == "prefill" else self.spec.decode_tp
        if tp > 1:
            args += ["--tensor-parallel-size", str(tp)]
        args += self.spec.extra_args
        return self._popen(name, role, args, ready, {"OMP_NUM_THREADS": str(threads)})

    def _popen(
        self, name: str, role: str, args: list[str], ready: Path, env_extra: dict[str, str], *, run: int = 0
    ) -> Child:
        log_path = self.log_dir / (f"{name}.log" if run == 0 else f"{name}.{run}.log")
        env = {**os.environ, **self.spec.env, **env_extra}
        with open(log_path, "wb") as log_fh:
            process = subprocess.Popen(
                args, stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        return Child(name, role, process, ready, log_path, args=args, env_extra=env_extra, num_restarts=run)

    def drain(self, child: Child) -> None:
        """SIGTERM one instance: it drains (--drain-grace-period) and exits 0."""
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)

    def restart(
        self, child: Child, *, exit_timeout_s: float = 300.0, ready_timeout_s: float = 600.0
    ) -> Child:
        """Drain ``child``, wait for its exit (ClusterError unless 0), start it again with the same
        command line (same node id, a new incarnation) and wait until it is healthy. Returns the new
        Child, which replaces the old one in ``children``."""
        self.drain(child)
        try:
            code = child.process.wait(timeout=exit_timeout_s)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{child.name} did not exit within {exit_timeout_s:.0f}s of SIGTERM") from None
        if code != 0:
            raise ClusterError(f"{child.name} exited with {code} after SIGTERM:\n{self.log_tail(child)}")
        child.ready_file.unlink(missing_ok=True)
        new = self._popen(
            child.name, child.role, child.args, child.ready_file, child.env_extra, run=child.num_restarts + 1
        )
        self.children[self.children.index(child)] = new
        self._wait_one(new, ready_timeout_s)
        return new

    def _wait_one(self, child: Child, timeout_s: float) -> None:
        start = time.monotonic()
        while not (child.info and _healthy(child.info)):
            code = child.process.poll()
            if code is not None:
                raise ClusterError(f"{child.name} exited with {code} while starting:\n{self.log_tail(child)}")
            if child.ready_file.exists() and not child.info:
                child.info = json.loads(child.ready_file.read_text())
            if time.monotonic() - start > timeout_s:
                raise ClusterError(
                    f"{child.name} not healthy after {timeout_s:.0f}s:\n{self.log_tail(child)}"
                )
            time.sleep(0.1)

    def wait_ready(
        self,
        timeout_s: float = 600.0,
        progress: Callable[[Child, float], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> bool:
        """Wait for every child's ready file and /health == 200; raise ClusterError with the child's
        log tail if one exits or the timeout passes. False when ``should_stop`` said so first."""
        start = time.monotonic()
        pending = list(self.children)
        while pending:
            if should_stop():
                return False
            for child in list(pending):
                code = child.process.poll()
                if code is not None:
                    raise ClusterError(
                        f"{child.name} exited with {code} while starting:\n{self.log_tail(child)}"
                    )
                if child.ready_file.exists() and not child.info:
                    child.info = json.loads(child.ready_file.read_text())
                if child.info and _healthy(child.info):
                    pending.remove(child)
                    if progress is not None:
                        progress(child, time.monotonic() - start)
            if time.monotonic() - start > timeout_s:
                names = ", ".join(c.name for c in pending)
                raise ClusterError(
                    f"{names} not healthy after {timeout_s:.0f}s:\n"
                    + "\n".join(self.log_tail(c) for c in pending)
                )
            time.sleep(0.1)
        return True

    def log_tail(self, child: Child, lines: int = 25) -> str:
        try:
            text = child.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return f"({child.name}: no log)"
        return f"--- {child.name} ({child.log_file}) ---\n" + "\n".join(text[-lines:])

    def dead_children(self) -> list[Child]:
        return [c for c in self.children if c.process.poll() is not None]

    def kill(self, child: Child) -> None:
        """SIGKILL one instance (failure tests)."""
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGKILL)
            child.process.wait()

    def stop(self, grace_s: float = 15.0) -> None:
        for child in self.children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGINT)  # at once (SIGTERM would drain each one)
        deadline = time.monotonic() + grace_s
        for child in [*self.children, *self.retired]:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                child.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self._owns_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)


def _protocols(transfer: str) -> str:
    return {"ipc": "ipc,tcp", "tcp": "tcp", "rdma": "rdma,tcp"}[transfer]


def _healthy(info: dict[str, object]) -> bool:
    url = str(info.get("base_url", "")).removesuffix("/v1") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback URL we built
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False
