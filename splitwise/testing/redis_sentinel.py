"""A real Redis Sentinel deployment on loopback ports (tests): one master, one replica and three
sentinels (``redis-server <conf> --sentinel``), with a quick failover (down after 1 s)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from splitwise.testing.redis_server import RedisServer, RedisServerError, free_port

SERVICE = "mymaster"


@dataclass
class SentinelSet:
    host: str = "127.0.0.1"
    down_after_ms: int = 1000
    master: RedisServer | None = None
    replica: RedisServer | None = None
    sentinel_ports: list[int] = field(default_factory=list)
    _sentinels: list[subprocess.Popen[bytes]] = field(default_factory=list)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="splitwise-sentinel-")))

    @property
    def addresses(self) -> str:
        """``host:port,host:port,host:port`` (the --scheduler-sentinel value)."""
        return ",".join(f"{self.host}:{p}" for p in self.sentinel_ports)

    def start(self, timeout_s: float = 30.0) -> SentinelSet:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RedisServerError(
                "redis-server is not installed (Debian/Ubuntu: apt-get install -y redis-server)"
            )
        try:
            self._start_all(exe, timeout_s)
        except BaseException:  # a half-started set must not outlive the test
            self.stop()
            raise
        return self

    def _start_all(self, exe: str, timeout_s: float) -> None:
        self.master = RedisServer(host=self.host).start()
        self.replica = RedisServer(
            host=self.host, extra_args=["--replicaof", self.host, str(self.master.port)]
        )
        self.replica.start()
        for i in range(3):
            port = free_port(self.host)
            conf = self.workdir / f"sentinel-{i}.conf"
            conf.write_text(
                f"port {port}\nbind {self.host}\nprotected-mode no\ndir {self.workdir}\n"
                f"sentinel monitor {SERVICE} {self.host} {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self.sentinel_ports.append(port)
            self._sentinels.append(
                subprocess.Popen(
                    [exe, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        self._wait_ready(timeout_s)

    def _cli(self, port: int, *args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-h", self.host, "-p", str(port), *args], capture_output=True, text=True, timeout=10
        ).stdout

    def _wait_ready(self, timeout_s: float) -> None:
        """Every sentinel knows the master, the replica and the two other sentinels."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready = True
            for port in self.sentinel_ports:
                info = self._cli(port, "SENTINEL", "MASTER", SERVICE).split()
                fields = dict(zip(info[::2], info[1::2], strict=False))
                ready &= fields.get("num-slaves") == "1" and fields.get("num-other-sentinels") == "2"
            if ready:
                return
            time.sleep(0.2)
        self.stop()
        raise RedisServerError(f"sentinels did not see master, replica and each other in {timeout_s} s")

    def master_port(self) -> int:
        """The port the sentinels currently name as master."""
        answer = self._cli(self.sentinel_ports[0], "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE).split()
        return int(answer[1])

    def stop(self) -> None:
        for proc in self._sentinels:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._sentinels = []
        for server in (self.master, self.replica):
            if server is not None:
                server.stop()
