"""The ranks' communicator: two torch.distributed process groups over one TCPStore.

Not ``init_process_group``: that is process-global, and a test (or a bench) runs a TP=1 and a
TP=2 engine in one process. The backend follows the device: gloo on CPU, nccl on CUDA (the nccl
path is written but was not run on a GPU in this project yet).

    group     used for                                   timeout
    control   rank 0 -> all: the next step plan          none in practice (idle ranks wait)
    compute   all-reduce / all-gather inside a forward   ``compute_timeout_s``

A rank that dies breaks gloo's TCP pairs: the other ranks' next collective raises at once
("Connection closed by peer"); a wedged rank is caught by the compute timeout. Either surfaces as
``RankLostError``.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, TCPStore

from splitwise.engine.parallel.errors import RankLostError, TensorParallelError

_IDLE_TIMEOUT = datetime.timedelta(days=30)  # control group: ranks wait for work this long
LENGTH_DTYPE = torch.int64
FIRST_FRAME_BYTES = 4096  # a decode step plan of dozens of sequences fits


class RankGroup:
    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        store_host: str,
        store_port: int,
        device: torch.device,
        compute_timeout_s: float,
        store: Any = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        timeout = datetime.timedelta(seconds=compute_timeout_s)
        try:
            self._store = store or TCPStore(
                store_host, store_port, world_size, is_master=False, timeout=timeout
            )
            self._compute = self._group("compute", timeout)
            self._control = self._group("control", _IDLE_TIMEOUT)
        except RuntimeError as exc:
            raise TensorParallelError(
                f"rank {rank}: could not join the tensor-parallel group: {exc}"
            ) from None

    @staticmethod
    def master_store(world_size: int, timeout_s: float) -> Any:
        """Rank 0's store on a free loopback port (``.port`` says which)."""
        return TCPStore(
            "127.0.0.1",
            0,
            world_size,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )

    def _group(self, name: str, timeout: datetime.timedelta) -> Any:
        prefixed = PrefixStore(name, self._store)
        if self.device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            return dist.ProcessGroupNCCL(prefixed, self.rank, self.world_size, options)
        options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        return dist.ProcessGroupGloo(prefixed, self.rank, self.world_size, options)

    # -- collectives (every rank calls each one, in the same order) ----------------------------

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        self._wait(self._compute.allreduce([tensor]), "all-reduce")
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._wait(self._compute.allgather([parts], [tensor.contiguous()]), "all-gather")
        return parts

    def broadcast_bytes(self, payload: bytes | None) -> bytes:
        """Rank 0 sends ``payload``; every other rank passes None and receives it.

        One collective for the usual step plan: a fixed ``FIRST_FRAME_BYTES`` frame carries the
        length and the first bytes; only a longer plan needs a second broadcast (each costs a
        round trip through every rank, the largest part of a TP decode step on a loaded CPU)::

            frame  [0:8) length (int64, little endian)  [8:FIRST_FRAME_BYTES) payload head
            rest   payload[FIRST_FRAME_BYTES - 8:]      (second broadcast, only if needed)
        """
        head_room = FIRST_FRAME_BYTES - 8
        frame = torch.zeros(FIRST_FRAME_BYTES, dtype=torch.uint8)
        if payload is not None:
            frame[:8] = torch.tensor([len(payload)], dtype=LENGTH_DTYPE).view(torch.uint8)
            head = payload[:head_room]
            if head:
                frame[8 : 8 + len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        frame = self._broadcast(frame)
        length = int(frame[:8].clone().view(LENGTH_DTYPE).item())
        if payload is not None:
            if length > head_room:
                self._broadcast(torch.frombuffer(bytearray(payload[head_room:]), dtype=torch.uint8))
            return payload
        received = bytes(frame[8 : 8 + min(length, head_room)].numpy())
        if length > head_room:
            rest = self._broadcast(torch.empty(length - head_room, dtype=torch.uint8))
            received += bytes(rest.numpy())
        return received

    def _broadcast(self, data: torch.Tensor) -> torch.Tensor:
        """From rank 0, in place; a CPU tensor in and out (nccl moves device tensors only)."""
        moved = data.to(self.device) if self.device.type == "cuda" else data
        self._wait(self._control.broadcast(moved, 0), "broadcast")
        return moved.cpu()

    def _wait(self, work: Any, what: str) -> None:
        try:
            work.wait()
        except RuntimeError as exc:
            detail = (
                str(exc).split("] ", 1)[-1].split(". ", 1)[0]
            )  # gloo: "[file:line] Connection closed by peer ..."
            raise RankLostError(
                f"rank {self.rank}: {what} failed: a tensor-parallel rank is gone ({detail})"
            ) from None
