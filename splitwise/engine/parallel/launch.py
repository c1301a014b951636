"""Rank processes 1..N-1 of an instance: spawn, watch, stop. No orphans, ever.

    rank 0 (instance process)                 rank r (``python -m ...rank_main``)
    --------------------------------------    ---------------------------------------------
    Popen(stdin=PIPE); write RankLaunch  ->   read RankLaunch from stdin
    keep stdin open                           watchdog thread: stdin EOF -> os._exit
    monitor thread: proc.wait()          <-   exits (crash, kill, Shutdown)
      unexpected exit -> on_lost(rank)

The pipe is the parent-death signal: its write end closes when rank 0's process dies, however
it dies (SIGKILL included), so a rank never outlives its instance, even blocked in a collective.
An unexpected rank exit is reported to ``on_lost`` (the instance then exits non-zero).
"""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
from collections.abc import Callable

from splitwise.engine.parallel.errors import TensorParallelError
from splitwise.engine.parallel.messages import RankLaunch, encode
from splitwise.logging import get_logger

log = get_logger(__name__)

LENGTH = struct.Struct("!I")
_STOP_WAIT_S = 10.0


class RankProcesses:
    def __init__(self, launches: list[RankLaunch], on_lost: Callable[[int, int], None]) -> None:
        self._on_lost = on_lost
        self._closing = threading.Event()
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        try:
            for launch in launches:
                self.procs[launch.rank] = self._spawn(launch)
        except BaseException:
            self.close()
            raise
        for rank, proc in self.procs.items():
            threading.Thread(
                target=self._watch, args=(rank, proc), name=f"tp-rank-{rank}-monitor", daemon=True
            ).start()

    @staticmethod
    def _spawn(launch: RankLaunch) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitwise.engine.parallel.rank_main"], stdin=subprocess.PIPE
        )
        assert proc.stdin is not None
        payload = encode(launch)
        try:
            proc.stdin.write(LENGTH.pack(len(payload)) + payload)
            proc.stdin.flush()
        except OSError as exc:
            proc.kill()
            raise TensorParallelError(f"rank {launch.rank} did not start: {exc}") from None
        log.info("tensor-parallel rank started", rank=launch.rank, pid=proc.pid)
        return proc

    @property
    def pids(self) -> dict[int, int]:
        return {rank: proc.pid for rank, proc in self.procs.items()}

    def _watch(self, rank: int, proc: subprocess.Popen[bytes]) -> None:
        code = proc.wait()
        if self._closing.is_set():
            return
        log.error("tensor-parallel rank exited; the instance cannot serve", rank=rank, exit_code=code)
        self._on_lost(rank, code)

    def close(self) -> None:
        """Stop every rank: close its pipe (its watchdog exits it), then wait, then kill."""
        self._closing.set()
        for proc in self.procs.values():
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        for rank, proc in self.procs.items():
            try:
                proc.wait(timeout=_STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                log.warning("tensor-parallel rank did not stop; killing it", rank=rank)
                proc.kill()
                proc.wait()
