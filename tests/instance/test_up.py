"""`splitwise up` starts a cluster, answers a real request, and leaves nothing behind on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def _pids_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = (
                Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry))
    return found


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_serves_and_cleans_up(tiny_model: Path, tmp_path: Path) -> None:
    shm_before = set(Path("/dev/shm").glob("splitwise-kv-*"))
    out_path, err_path = tmp_path / "up.out", tmp_path / "up.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "splitwise.cli",
                "up",
                "--model",
                str(tiny_model),
                "--port",
                "0",
                "--transfer",
                "tcp",
            ],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
    try:
        base_url = ""
        deadline = time.monotonic() + 180
        while not base_url:
            assert proc.poll() is None, err_path.read_text()
            assert time.monotonic() < deadline, err_path.read_text()
            match = re.search(r"OpenAI base URL: (\S+)", out_path.read_text())
            base_url = match.group(1) if match else ""
            time.sleep(0.2)
        progress = err_path.read_text()
        assert "prefill-0" in progress and "decode-0" in progress and "ready in" in progress
        assert "router-0" in progress
        log_dir = re.search(r"logs in (\S+)\)", progress).group(1)  # type: ignore[union-attr]
        redis_port = int(re.search(r"redis-server on 127\.0\.0\.1:(\d+)", progress).group(1))  # type: ignore[union-attr]
        resp = httpx.post(
            f"{base_url}/completions", json={"prompt": "Hi", "max_tokens": 4, "ignore_eos": True}, timeout=60
        )
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4
        instance_pids = _pids_mentioning(log_dir)
        assert len(instance_pids) == 3  # the two instances and the router (whose URL is the base URL)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, err_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _pids_mentioning(log_dir) == []
    assert not Path(log_dir).exists()  # temp dirs (logs, redis-server's) are removed on exit
    assert not _port_open(redis_port)
    port = int(base_url.rsplit(":", 1)[1].split("/")[0])
    assert not _port_open(port)
    assert "stopped" in err_path.read_text()
    # Segments are named splitwise-kv-<owner pid>-<hex>: only the instances' own count (other
    # processes on a shared machine may create segments meanwhile).
    left = set(Path("/dev/shm").glob("splitwise-kv-*")) - shm_before
    assert [p.name for p in left if int(p.name.split("-")[2]) in instance_pids] == []
