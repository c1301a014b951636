"""`splitwise serve`'s command line as users paste it from FastDeploy, vLLM and SGLang.

Before click parses the arguments, ``ServeCommand`` reads them once and

- rewrites the spellings other servers use for a flag we have (``--model-path`` -> ``--model``,
  ``--disaggregation-mode`` -> ``--splitwise-role``, a positional model -> ``--model``, ...);
- drops the flags that have no meaning here, with a one-line note each (FastDeploy's
  ``--engine-worker-queue-port``: splitwise has no engine worker process);
- refuses the flags whose meaning we cannot honour, each with a one-line reason;
- reports every remaining unknown flag, with the nearest known one (difflib);

and reports every problem of the command line at once, not the first one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import click

# Another server's spelling -> ours (the value, if any, is kept).
ALIASES: dict[str, str] = {
    "--model-path": "--model",  # SGLang
    "--model-name-or-path": "--model",
    "--num-gpu-blocks-override": "--num-kv-blocks",  # vLLM, FastDeploy
    "--context-length": "--max-model-len",  # SGLang
    "--max-running-requests": "--max-num-seqs",  # SGLang
    "--chunked-prefill-size": "--max-num-batched-tokens",  # SGLang
    "--disable-radix-cache": "--no-enable-prefix-caching",  # SGLang
    "--disaggregation-mode": "--splitwise-role",  # SGLang: prefill | decode | null
    "--random-seed": "--seed",  # SGLang
    "--metrics-port-number": "--metrics-port",
}
# Values of another server that mean one of ours.
VALUE_ALIASES: dict[str, dict[str, str]] = {
    "--splitwise-role": {"null": "mixed", "none": "mixed"},
    "--dtype": {
        "half": "float16",
        "float": "float32",
        "bf16": "bfloat16",
        "fp16": "float16",
        "fp32": "float32",
    },
}
# Accepted and ignored, with this note: they change nothing a splitwise instance does.
NO_EFFECT: dict[str, str] = {
    "--engine-worker-queue-port": "the engine runs inside the instance process (no worker queue)",
    "--cache-queue-port": "KV transfer runs inside the instance process (no cache-transfer manager queue)",
    "--trust-remote-code": "splitwise never runs code from the checkpoint; it reads config.json and safetensors",
    "--enforce-eager": "splitwise runs eagerly (no CUDA graphs)",
    "--enable-chunked-prefill": "chunked prefill is always on (--max-num-batched-tokens is the chunk)",
    "--disable-log-requests": "per-request lines are INFO logs; --log-level WARNING silences them",
    "--disable-log-stats": "splitwise logs no periodic stats; use /metrics",
    "--enable-metrics": "/metrics is always on",
    "--scheduler-sync-period": "load reports follow --scheduler-heartbeat-interval",
    "--scheduler-expire-period": "nodes expire after --scheduler-dead-after-missed heartbeats",
}
# Refused: what the flag asks for and what to do instead.
UNSUPPORTED: dict[str, str] = {
    "--quantization": "quantized weights are not supported; serve the float16/bfloat16/float32 checkpoint",
    "--gpu-memory-utilization": "not supported; size the KV cache with --kv-cache-memory-gb or --num-kv-blocks",
    "--mem-fraction-static": "not supported; size the KV cache with --kv-cache-memory-gb or --num-kv-blocks",
    "--kv-cache-ratio": "not supported; size the KV cache with --kv-cache-memory-gb or --num-kv-blocks",
    "--kv-cache-dtype": "not supported; the KV cache uses the model's --dtype",
    "--tokenizer": "not supported; the tokenizer is read from the --model directory",
    "--data-parallel-size": "not supported; data parallelism means more instances: start one `splitwise serve` per GPU",
    "--dp": "not supported; data parallelism means more instances: start one `splitwise serve` per GPU",
    "--dp-size": "not supported; data parallelism means more instances: start one `splitwise serve` per GPU",
    "--pipeline-parallel-size": "pipeline parallelism is not supported (one GPU per instance)",
    "--pp": "pipeline parallelism is not supported (one GPU per instance)",
    "--router": (
        "instances do not register with a router: they join the cluster through Redis "
        "(--scheduler-host/--scheduler-port/--scheduler-topic, or --scheduler-url); the front door is "
        "`splitwise router` with the same Redis flags (or send requests to any instance)"
    ),
    "--innode-prefill-ports": "not supported; start each prefill instance as its own `splitwise serve --splitwise-role prefill`",
    "--kv-transfer-config": "not supported; P/D is configured with --splitwise-role and --cache-transfer-protocol",
    "--load-format": "not supported; checkpoints are loaded from safetensors",
}
# Of those, the ones that take no value (the next argument may be a positional model).
NO_EFFECT_SWITCHES = frozenset(
    {
        "--trust-remote-code",
        "--enforce-eager",
        "--enable-chunked-prefill",
        "--disable-log-requests",
        "--disable-log-stats",
        "--enable-metrics",
    }
)
DTYPE_VALUES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class _Scan:
    args: list[str]
    notes: list[str]
    errors: list[str]


class ServeCommand(click.Command):
    """A click command whose ``parse_args`` first normalizes the pasted command line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        scan = normalize(args, self._known_flags())
        if scan.errors:
            raise click.UsageError("\n".join(scan.errors), ctx=ctx)
        for note in scan.notes:
            click.echo(f"note: {note}", err=True)
        return super().parse_args(ctx, scan.args)

    def _known_flags(self) -> dict[str, bool]:
        """Every flag spelling -> whether it takes a value."""
        known: dict[str, bool] = {"--help": False}
        for param in self.params:
            if isinstance(param, click.Option):
                takes_value = not (param.is_flag or param.count)
                for name in (*param.opts, *param.secondary_opts):
                    known[name] = takes_value
        return known


def normalize(args: list[str], known: dict[str, bool]) -> _Scan:
    """Rewrite, drop, refuse or flag each argument (see the module docstring)."""
    scan = _Scan([], [], [])
    positional: list[str] = []
    cursor = _Cursor(args)
    while cursor.has_next():
        arg = cursor.next()
        if arg == "--":
            positional += cursor.rest()
            break
        if not arg.startswith("--"):
            if arg.startswith("-") and len(arg) > 1:
                scan.args.append(arg)  # short options: click reports them
            else:
                positional.append(arg)
            continue
        _one_flag(arg, cursor, known, scan)
    if positional:
        _positional_model(positional, scan.args, scan.errors)
    return scan


class _Cursor:
    def __init__(self, args: list[str]) -> None:
        self._args, self._i = args, 0

    def has_next(self) -> bool:
        return self._i < len(self._args)

    def next(self) -> str:
        self._i += 1
        return self._args[self._i - 1]

    def rest(self) -> list[str]:
        rest, self._i = self._args[self._i :], len(self._args)
        return rest

    def value(self, *, unknown_flag: bool = False) -> str | None:
        """The next argument as a flag's value: not when it is a flag (for flags we do not know,
        not when it looks like any option)."""
        if not self.has_next():
            return None
        nxt = self._args[self._i]
        if nxt.startswith("--") or (unknown_flag and nxt.startswith("-")):
            return None
        return self.next()


def _one_flag(arg: str, cursor: _Cursor, known: dict[str, bool], scan: _Scan) -> None:
    flag, eq, inline = arg.partition("=")
    flag = ALIASES.get(flag, flag)
    if flag in known:
        if not known[flag]:
            scan.args.append(f"{flag}={inline}" if eq else flag)
            return
        value = inline if eq else cursor.value()
        if value is None:
            scan.args.append(flag)  # click reports the missing value
            return
        scan.args += [flag, VALUE_ALIASES.get(flag, {}).get(value.lower(), value)]
        return
    if flag in NO_EFFECT_SWITCHES:
        scan.notes.append(f"{flag} has no effect: {NO_EFFECT[flag]}")
        return
    value = inline if eq else cursor.value(unknown_flag=True)
    if flag in NO_EFFECT:
        scan.notes.append(f"{flag} has no effect: {NO_EFFECT[flag]}")
    elif flag in UNSUPPORTED:
        scan.errors.append(f"{flag}: {UNSUPPORTED[flag]}")
    else:
        scan.errors.append(_unknown(flag, known))


def _positional_model(positional: list[str], out: list[str], errors: list[str]) -> None:
    if "--model" in out:
        errors.append(f"unexpected argument(s) {positional}: the model is already given with --model")
    elif len(positional) > 1:
        errors.append(f"unexpected arguments {positional}: give one model directory")
    else:
        out += ["--model", positional[0]]  # `vllm serve MODEL`


def _unknown(flag: str, known: dict[str, bool]) -> str:
    candidates = [*known, *ALIASES, *NO_EFFECT, *UNSUPPORTED]
    close = difflib.get_close_matches(flag, candidates, n=1, cutoff=0.7)
    hint = f"; did you mean {ALIASES.get(close[0], close[0])}?" if close else ""
    return f"no such option: {flag}{hint}"


def dtype_from_checkpoint(
    model_dir: str, device: str, read_config: Callable[[str], dict[str, object]]
) -> str:
    """``--dtype auto`` (vLLM): the checkpoint's torch_dtype when it is a float dtype we run, and
    float32 for float32 checkpoints; on CPU bfloat16 where the CPU has native bf16 (measured faster,
    ``engine.cpu_dtype``), else float32 (emulated half precision matmuls are slow)."""
    if device == "cpu":
        from splitwise.engine.cpu_dtype import auto_cpu_dtype

        return auto_cpu_dtype()
    declared = str(read_config(model_dir).get("torch_dtype", "float32"))
    return declared if declared in DTYPE_VALUES[1:] else "float32"
