"""A real 3-master Redis Cluster on loopback ports (tests): ``redis-server --cluster-enabled yes``
per node, joined with ``redis-cli --cluster create``. Missing binaries are an error, not a skip."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field

from splitwise.testing.redis_server import RedisServer, RedisServerError, free_port


def free_cluster_port(host: str = "127.0.0.1") -> int:
    """A free port whose cluster bus port (port + 10000) is a valid, free port too: an ephemeral
    port above 55535 would make redis-server exit at start."""
    for _ in range(200):
        port = free_port(host)
        if port + 10000 > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port + 10000))
            except OSError:
                continue
        return port
    raise RedisServerError(f"no free port pair (port, port + 10000) on {host}")


@dataclass
class RedisClusterServers:
    num_masters: int = 3
    host: str = "127.0.0.1"
    servers: list[RedisServer] = field(default_factory=list)

    @property
    def seed(self) -> RedisServer:
        return self.servers[0]

    def start(self, timeout_s: float = 30.0) -> RedisClusterServers:
        """Start the masters and join them; on any failure every server already started is stopped
        (a half-started cluster must not outlive the test)."""
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RedisServerError(
                "redis-cli is not installed (Debian/Ubuntu: apt-get install -y redis-tools)"
            )
        try:
            self._start_masters()
            addresses = [f"{s.host}:{s.port}" for s in self.servers]
            created = subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
            if created.returncode != 0:
                raise RedisServerError(f"redis-cli --cluster create failed: {created.stdout}{created.stderr}")
            self._wait_ok(cli, timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_masters(self) -> None:
        for _ in range(self.num_masters):
            server = RedisServer(host=self.host, port=free_cluster_port(self.host))
            server.extra_args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(server.workdir / "nodes.conf"),
                "--cluster-node-timeout",
                "2000",
            ]
            self.servers.append(server.start())

    def _wait_ok(self, cli: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = [
                subprocess.run(
                    [cli, "-h", s.host, "-p", str(s.port), "CLUSTER", "INFO"], capture_output=True, text=True
                ).stdout
                for s in self.servers
            ]
            if all("cluster_state:ok" in state for state in states):
                return
            time.sleep(0.1)
        self.stop()
        raise RedisServerError(f"Redis Cluster did not reach cluster_state:ok in {timeout_s} s")

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers = []
