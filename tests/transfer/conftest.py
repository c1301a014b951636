from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transfer_peer import GEOMETRY, endpoint_from_json, endpoint_to_json

from splitwise.engine.kv_cache import KVCacheGeometry
from splitwise.transfer.base import Endpoint

PEER_SCRIPT = Path(__file__).with_name("transfer_peer.py")


class PeerProcess:
    """A transfer peer (transfer_peer.py) in its own process; ``ask`` sends one command."""

    def __init__(
        self, role: str, protocol: str, geometry: KVCacheGeometry, seed: int, device: str = "cpu"
    ) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(PEER_SCRIPT),
                "--role",
                role,
                "--protocol",
                protocol,
                "--geometry",
                json.dumps(dataclasses.asdict(geometry)),
                "--seed",
                str(seed),
                "--device",
                device,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.geometry = geometry
        self.killed = False
        raw = self._read(timeout_s=30.0)["endpoint"]
        self.endpoint: Endpoint | None = endpoint_from_json(raw) if raw is not None else None

    def ask(self, read_timeout_s: float = 15.0, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        if isinstance(cmd.get("endpoint"), Endpoint):
            cmd = {**cmd, "endpoint": endpoint_to_json(cmd["endpoint"])}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read(read_timeout_s)

    def kv(self) -> torch.Tensor:
        raw = bytes.fromhex(self.ask(op="dump")["hex"])
        return torch.frombuffer(bytearray(raw), dtype=self.geometry.torch_dtype).view(self.geometry.shape)

    def kill(self) -> None:
        self.killed = True
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask(op="exit", read_timeout_s=5.0)
            except (OSError, TimeoutError, RuntimeError):
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()

    def _read(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError(f"peer process gave no reply within {timeout_s}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer process exited (rc={self.proc.poll()})")
        return json.loads(line)  # type: ignore[no-any-return]


@pytest.fixture()
def spawn_peer() -> Iterator[Any]:
    peers: list[PeerProcess] = []

    def spawn(
        role: str, protocol: str, seed: int = 1, geometry: KVCacheGeometry = GEOMETRY, device: str = "cpu"
    ) -> PeerProcess:
        peer = PeerProcess(role, protocol, geometry, seed, device)
        peers.append(peer)
        return peer

    yield spawn
    for peer in peers:
        peer.stop()
    # A killed peer cannot unlink its segment (that is the point of killing it); any other must.
    leaked = []
    for name in os.listdir("/dev/shm"):
        for peer in peers:
            if name.startswith(f"splitwise-test-{peer.proc.pid}-"):
                os.unlink(f"/dev/shm/{name}")
                if not peer.killed:
                    leaked.append(name)
    assert not leaked, f"shared memory segments leaked: {leaked}"
