"""The scheduler's TLS option against a real TLS-only redis-server (certificates made with openssl)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler.config import SchedulerConfig
from scheduler.connection import check_server, make_client
from scheduler.errors import SchedulerConnectionError
from scheduler.messages import KVGeometry, NodeInfo
from scheduler.node import NodeAgent
from splitwise.testing.redis_server import free_port


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture()
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    assert shutil.which("openssl"), "openssl is needed to make test certificates (apt-get install openssl)"
    assert shutil.which("redis-server"), "redis-server is not installed (apt-get install redis-server)"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=splitwise-test-ca",
        cwd=tmp_path,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
        cwd=tmp_path,
    )
    (tmp_path / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        cwd=tmp_path,
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--tls-cert-file",
            "server.crt",
            "--tls-key-file",
            "server.key",
            "--tls-ca-cert-file",
            "ca.crt",
            "--tls-auth-clients",
            "no",
            "--dir",
            str(tmp_path),
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None and time.monotonic() < deadline, "TLS redis-server did not start"
        time.sleep(0.05)
    try:
        yield port, tmp_path / "ca.crt"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_node_registers_over_tls_and_plain_tcp_is_refused(tls_redis: tuple[int, Path]) -> None:
    port, ca = tls_redis
    tls = SchedulerConfig(
        scheduler_port=port,
        scheduler_topic="tls",
        scheduler_tls=True,
        scheduler_tls_ca_certs=str(ca),
        heartbeat_interval_s=0.2,
    )
    plain = SchedulerConfig(scheduler_port=port, scheduler_topic="tls")

    async def scenario() -> str:
        agent = NodeAgent(tls)
        info = NodeInfo(
            node_id="tls-node",
            role="mixed",
            host="127.0.0.1",
            http_port=1,
            pd_comm_port=2,
            model_id="m",
            kv=KVGeometry("float32", 16, 2, 2, 16),
        )
        await agent.start(info)
        try:
            client = make_client(plain)
            with pytest.raises(SchedulerConnectionError):
                await check_server(client, plain)
            await client.aclose()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "splitwise.cli",
                "inspect",
                "--scheduler-port",
                str(port),
                "--scheduler-topic",
                "tls",
                "--scheduler-tls",
                "--scheduler-tls-ca-certs",
                str(ca),
                "--json",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, stderr.decode()
            return stdout.decode()
        finally:
            await agent.close()

    report = json.loads(asyncio.run(scenario()))
    node = next(n for n in report["nodes"] if "tls-node" in json.dumps(n))
    assert "tls-node" in json.dumps(node)
