"""`splitwise serve`'s command line: pasted FastDeploy/vLLM/SGLang flags, every unknown flag at
once, and start-up failures as one line naming the flag (the real CLI as a subprocess)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from splitwise.commands.serve import serve
from splitwise.commands.serve_flags import ServeCommand, normalize
from splitwise.engine.tiny_model import default_model_dir
from splitwise.testing.redis_server import RedisServer, free_port

KNOWN = ServeCommand._known_flags(serve)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_model() -> Path:
    return default_model_dir("tiny")


def run_serve(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splitwise.cli", "serve", "--torch-threads", "1", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


# --- the command line, parsed in-process ------------------------------------------------------


def test_fastdeploy_pd_command_runs_as_documented() -> None:
    # FastDeploy's documented prefill command (docs/features/disaggregated.md), TP 1.
    args = (
        "--model /m --port 8180 --metrics-port 8181 --engine-worker-queue-port 8182 "
        "--cache-queue-port 8183 --tensor-parallel-size 1 --max-model-len 2048 --max-num-seqs 16 "
        "--cache-transfer-protocol rdma,ipc --rdma-comm-ports 7671 --pd-comm-port 2334 "
        "--splitwise-role prefill --scheduler-name splitwise --scheduler-host 127.0.0.1 "
        "--scheduler-port 6379 --scheduler-topic test --scheduler-ttl 9000"
    ).split()
    scan = normalize(args, KNOWN)
    assert scan.errors == []
    assert "--engine-worker-queue-port" not in scan.args and "8182" not in scan.args
    assert scan.args[scan.args.index("--tensor-parallel-size") + 1] == "1"
    assert [n.split(" ", 1)[0] for n in scan.notes] == ["--engine-worker-queue-port", "--cache-queue-port"]
    assert scan.args[scan.args.index("--max-num-seqs") + 1] == "16"


def test_vllm_and_sglang_spellings_map_to_ours() -> None:
    scan = normalize(
        "/models/qwen --dtype half --trust-remote-code --num-gpu-blocks-override 64".split(), KNOWN
    )
    assert scan.errors == []
    assert scan.args == ["--dtype", "float16", "--num-kv-blocks", "64", "--model", "/models/qwen"]
    sglang = normalize(
        "--model-path /m --disaggregation-mode null --context-length 512 --disable-radix-cache".split(), KNOWN
    )
    assert sglang.args == [
        "--model",
        "/m",
        "--splitwise-role",
        "mixed",
        "--max-model-len",
        "512",
        "--no-enable-prefix-caching",
    ]
    assert normalize(["--disaggregation-mode=decode"], KNOWN).args == ["--splitwise-role", "decode"]


def test_every_problem_is_reported_at_once_with_a_suggestion() -> None:
    scan = normalize(
        "--max-num-seq 4 --gpu-memory-utilization 0.9 --tp 4 --quantization wint4 --bogus x".split(), KNOWN
    )
    assert scan.errors == [
        "no such option: --max-num-seq; did you mean --max-num-seqs?",
        "--gpu-memory-utilization: not supported; size the KV cache with --kv-cache-memory-gb or --num-kv-blocks",
        "--quantization: quantized weights are not supported; serve the float16/bfloat16/float32 checkpoint",
        "no such option: --bogus",
    ]
    [router] = normalize(["--router", "10.0.0.1:9000"], KNOWN).errors
    assert router.startswith("--router: ") and "--scheduler-host" in router and "splitwise router" in router
    assert normalize(["--modle", "/m"], KNOWN).errors == ["no such option: --modle; did you mean --model?"]
    assert normalize(["/a", "/b"], KNOWN).errors == [
        "unexpected arguments ['/a', '/b']: give one model directory"
    ]


def test_default_port_is_8000() -> None:
    port = next(p for p in serve.params if p.name == "port")
    assert port.default == 8000


# --- the real CLI ---------------------------------------------------------------------------------


def test_unknown_flags_exit_2_all_named(tiny_model: Path) -> None:
    result = run_serve("--model", str(tiny_model), "--max-num-seq", "4", "--foo", "--tp", "2")
    assert result.returncode == 2
    errors = error_lines(result)
    assert len(errors) == 2 and "did you mean --max-num-seqs?" in errors[0]
    assert "--foo" in errors[1]


def test_tensor_parallel_size_the_model_cannot_shard_exits_2(tiny_model: Path) -> None:
    result = run_serve("--model", str(tiny_model), "--tp", "3")
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if "--tensor-parallel-size" in line]
    assert "3 does not divide the model's 4 attention heads" in line


def test_taken_port_is_one_line_before_the_model_loads(tiny_model: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve("--model", str(tiny_model), "--port", str(port))
    assert result.returncode == 1
    assert error_lines(result) == [
        f"error: --port {port}: 127.0.0.1:{port} is already in use (another server?); "
        "choose another port, or 0 for a free one"
    ]
    assert "loading model" not in result.stderr + result.stdout


def test_bad_model_dir_and_too_long_context(tiny_model: Path, tmp_path: Path) -> None:
    result = run_serve("--model", str(tmp_path))
    assert result.returncode == 2
    assert error_lines(result) == [
        f"error: Invalid value for --model: {tmp_path} has no config.json (expected a Hugging Face model directory)"
    ]
    result = run_serve("--model", str(tiny_model), "--max-model-len", "1000000", "--port", "0")
    assert result.returncode == 2
    [line] = error_lines(result)
    assert line.startswith("error: Invalid value for --max-model-len: 1000000 exceeds the model's context")


def test_unreachable_redis_names_the_scheduler_flags(tiny_model: Path) -> None:
    port = free_port()
    result = run_serve(
        "--model",
        str(tiny_model),
        "--splitwise-role",
        "prefill",
        "--scheduler-port",
        str(port),
        "--port",
        "0",
    )
    assert result.returncode == 1
    [line] = error_lines(result)
    assert line.startswith(
        f"error: --scheduler-host/--scheduler-port: cannot reach Redis at 127.0.0.1:{port}"
    )


def test_wrong_redis_password_names_the_password_flag(tiny_model: Path) -> None:
    redis = RedisServer(password="right-password").start()
    try:
        for password in ("wrong-password", None):
            extra = ["--scheduler-password", password] if password else []
            result = run_serve(
                "--model",
                str(tiny_model),
                "--splitwise-role",
                "prefill",
                "--scheduler-port",
                str(redis.port),
                "--port",
                "0",
                *extra,
            )
            assert result.returncode == 1
            [line] = error_lines(result)
            assert line.startswith(f"error: --scheduler-password: Redis at 127.0.0.1:{redis.port} refused"), (
                line
            )
    finally:
        redis.stop()


def test_rdma_without_a_device_names_the_protocol_flag(tiny_model: Path) -> None:
    # A real Redis: the transports start after the node has the cluster token from Redis.
    redis = RedisServer().start()
    try:
        result = run_serve(
            "--model",
            str(tiny_model),
            "--splitwise-role",
            "decode",
            "--cache-transfer-protocol",
            "rdma",
            "--port",
            "0",
            "--scheduler-port",
            str(redis.port),
        )
    finally:
        redis.stop()
    assert result.returncode == 1
    [line] = error_lines(result)
    assert line.startswith(
        "error: --cache-transfer-protocol: none of ['rdma'] can be used on this node (rdma: "
    ), line


def test_wildcard_host_is_never_advertised(tiny_model: Path, tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "splitwise.cli", "serve", "--model", str(tiny_model), "--torch-threads", "1"]
        + ["--host", "0.0.0.0", "--port", "0", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        import time

        deadline = time.monotonic() + 180
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.exists(), proc.stderr.read().decode() if proc.stderr else ""
        base_url = json.loads(ready.read_text())["base_url"]
        assert "0.0.0.0" not in base_url and base_url.startswith("http://")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_up_reports_unknown_flags_the_same_way() -> None:
    from splitwise.commands.up import up

    known = ServeCommand._known_flags(up)  # type: ignore[arg-type]
    scan = normalize(["--prefil", "2", "--model-path", "/m"], known)
    assert scan.errors == ["no such option: --prefil; did you mean --prefill?"]
    assert scan.args == ["--model", "/m"]


def test_rdma_comm_ports_one_or_one_per_rank(tiny_model: Path) -> None:
    result = run_serve("--model", str(tiny_model), "--tp", "2", "--rdma-comm-ports", "7671,7672,7673")
    assert result.returncode == 2
    assert "--rdma-comm-ports" in result.stderr and "one per tensor-parallel rank (2)" in result.stderr


def test_cuda_tensor_parallel_is_mixed_only(tiny_model: Path) -> None:
    result = run_serve(
        "--model", str(tiny_model), "--tp", "2", "--device", "cuda", "--splitwise-role", "decode"
    )
    assert result.returncode == 2
    assert "--tensor-parallel-size" in result.stderr and "mixed only" in result.stderr
