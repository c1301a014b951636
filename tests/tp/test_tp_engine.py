"""Tensor parallelism in the engine: real rank processes, real gloo, on CPU.

Greedy tokens of TP=2 equal TP=1 token for token (fp32; the all-reduce changes summation order,
so logprobs are compared with a tolerance), with chunked prefill and prefix caching on, for a
model whose KV heads are replicated (1 KV head, TP 2) and one whose KV heads are split (4, TP 2).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from splitwise.engine.parallel.runner import TPModelRunner
from tests.tp.tp_support import GREEDY, LONG, engine, is_alive, run


@pytest.mark.parametrize(("size", "arch"), [("tiny-mqa", "llama"), ("tiny-mha", "qwen3")])
def test_tp2_greedy_equals_tp1(size: str, arch: str) -> None:
    reference = engine(size, arch, 1)
    try:
        expected = run(reference)
    finally:
        reference.close()
    parallel = engine(size, arch, 2)
    try:
        assert isinstance(parallel.runner, TPModelRunner)
        pids = list(parallel.runner.rank_pids.values())
        got = run(parallel)
    finally:
        parallel.close()
    assert [r.error for r in got] == [None, None]
    assert [r.token_ids for r in got] == [r.token_ids for r in expected]
    for ours, ref in zip(got, expected, strict=True):
        assert ours.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    assert got[1].num_cached_tokens == expected[1].num_cached_tokens == 16  # the prefix cache hit
    assert pids and not any(is_alive(pid) for pid in pids)  # close() reaped every rank


def test_killed_rank_fails_the_request_and_nothing_is_left() -> None:
    eng = engine("tiny", "llama", 2)
    try:
        assert isinstance(eng.runner, TPModelRunner)
        (pid,) = eng.runner.rank_pids.values()
        assert eng.generate([LONG[:6]], GREEDY)[0].error is None
        subprocess.run(["kill", "-9", str(pid)], check=True)
        deadline = time.monotonic() + 60
        while eng.runner.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)  # the monitor thread reaps the rank; polling a real process exit
        assert eng.runner.lost is not None and "rank 1" in eng.runner.lost
        with pytest.raises(Exception, match="rank 1"):
            eng.generate([LONG], GREEDY)
    finally:
        eng.close()
    assert not is_alive(pid)


CHILD = """
import sys, time
from tests.tp.tp_support import engine
eng = engine("tiny", "llama", 2)
print(*eng.runner.rank_pids.values(), flush=True)
time.sleep(600)
"""


def test_ranks_die_with_their_parent() -> None:
    """SIGKILL of the instance process (no cleanup runs): its rank sees the pipe close and exits."""
    parent = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        rank_pids = [int(p) for p in line.split()]
        assert rank_pids and all(is_alive(p) for p in rank_pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 60
        while any(is_alive(p) for p in rank_pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(is_alive(p) for p in rank_pids)
    finally:
        parent.kill()
        parent.wait()


def test_a_rank_that_dies_at_start_up_fails_the_engine_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not after the group's 300 s join timeout: the monitor sees the exit while rank 0 waits."""
    from splitwise.engine.parallel import launch
    from splitwise.engine.parallel.errors import TensorParallelError

    def crashing_spawn(message: launch.RankLaunch) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"], stdin=subprocess.PIPE)
        return proc

    monkeypatch.setattr(launch.RankProcesses, "_spawn", staticmethod(crashing_spawn))
    start = time.monotonic()
    with pytest.raises(
        TensorParallelError, match="rank 1 exited with code 3 before the tensor-parallel group formed"
    ):
        engine("tiny", "llama", 2)
    assert time.monotonic() - start < 120  # far below the join timeout (300 s)
