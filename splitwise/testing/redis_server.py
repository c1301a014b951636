"""Start a real redis-server on a free loopback port (tests, benchmarks, `splitwise up`).

A missing redis-server is an error with a clear message, never a silent skip.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from splitwise.errors import SplitwiseError


class RedisServerError(SplitwiseError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """A redis-server child process. ``restart()`` keeps the port (for outage tests)."""

    host: str = "127.0.0.1"
    port: int = 0
    password: str | None = None
    process: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)  # e.g. --cluster-enabled yes, --replicaof h p
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="splitwise-redis-")))

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start and wait until it accepts connections. A port lost to another process between
        ``free_port`` and the bind (the machine is shared) is retried on a fresh port."""
        for attempt in range(3):
            try:
                return self._start_once(timeout_s)
            except RedisServerError as exc:
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
                self.port = free_port(self.host)
        raise AssertionError("unreachable")

    def _start_once(self, timeout_s: float) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        exe = shutil.which("redis-server")
        if exe is None:
            raise RedisServerError(
                "redis-server is not installed: install it (Debian/Ubuntu: apt-get install -y redis-server)"
            )
        if self.port == 0:
            self.port = free_port(self.host)
        args = [
            exe,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--protected-mode",
            "no",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.extra_args
        log_file = self.workdir / f"redis-{self.port}.log"  # redis logs there, not to stderr
        args += ["--logfile", str(log_file)]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                if log_file.exists():
                    err += log_file.read_text(errors="replace")[-2000:]
                raise RedisServerError(f"redis-server exited with {self.process.returncode}: {err.strip()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    pass
            except OSError:
                time.sleep(0.02)
                continue
            time.sleep(0.05)  # someone else may own the port: a failed bind exits at once
            if self.process.poll() is None:
                return self
        self.stop()
        raise RedisServerError(
            f"redis-server did not accept connections on {self.host}:{self.port} in {timeout_s}s"
        )

    def stop(self) -> None:
        """Stop the server and remove its working directory (start() makes a fresh one)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()
