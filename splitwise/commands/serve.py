"""`splitwise serve`: one instance (mixed, prefill or decode) with FastDeploy's launch flags.

Also reachable as ``python -m splitwise.entrypoints.api_server``. This is the instance process's
error boundary: bad flags exit 2 naming the flag; start-up failures (model, Redis) exit 1 with
the reason; SIGTERM drains (stop taking work, finish or hand back what runs within
--drain-grace-period, deregister, exit 0; a second SIGTERM stops at once); SIGINT shuts down at
once (deregister, close listeners, free shared memory).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

import click

from scheduler.config import SchedulerConfig, scheduler_options
from splitwise.commands.options import read_model_config, resolve_model
from splitwise.commands.serve_flags import ServeCommand, dtype_from_checkpoint
from splitwise.commands.startup_errors import StartupError, check_ports_free, explain_startup_error
from splitwise.instance.host_identity import is_wildcard, routable_address


def _instance_config(opts: dict[str, Any]) -> Any:
    from splitwise.engine.config import EngineConfig
    from splitwise.instance.config import InstanceConfig, parse_ports
    from splitwise.transfer.registry import parse_protocols

    model_dir = resolve_model(opts["model"], default_size=opts["default_model_size"])
    _check_model(str(model_dir), opts["max_model_len"])
    _check_tensor_parallel(
        str(model_dir), opts["tensor_parallel_size"], opts["device"], opts["splitwise_role"]
    )
    rdma_ports = parse_ports(opts["rdma_comm_ports"], "--rdma-comm-ports")
    if len(rdma_ports) > 1 and len(rdma_ports) != opts["tensor_parallel_size"]:
        raise click.BadParameter(
            f"{len(rdma_ports)} ports given: give one, or one per tensor-parallel rank "
            f"({opts['tensor_parallel_size']})",
            param_hint="--rdma-comm-ports",
        )
    dtype = opts["dtype"]
    if dtype == "auto":
        dtype = dtype_from_checkpoint(str(model_dir), opts["device"], read_model_config)
    engine = EngineConfig(
        model=str(model_dir),
        dtype=dtype,
        device=opts["device"],
        block_size=opts["block_size"],
        num_kv_blocks=opts["num_kv_blocks"],
        kv_cache_memory_bytes=int(opts["kv_cache_memory_gb"] * (1 << 30)),
        max_model_len=opts["max_model_len"],
        max_num_seqs=opts["max_num_seqs"],
        max_num_batched_tokens=opts["max_num_batched_tokens"],
        enable_prefix_caching=opts["enable_prefix_caching"],
        seed=opts["seed"],
        tensor_parallel_size=opts["tensor_parallel_size"],
        detokenize=False,  # the HTTP frontend detokenizes; the engine only checks stop strings
    )
    return InstanceConfig(
        engine=engine,
        scheduler=SchedulerConfig.from_options(opts),
        role=opts["splitwise_role"],
        host=opts["host"],
        advertise_host=opts["advertise_host"] or (routable_address() if is_wildcard(opts["host"]) else None),
        port=opts["port"],
        metrics_port=opts["metrics_port"],
        pd_comm_port=opts["pd_comm_port"],
        cache_transfer_protocols=parse_protocols(opts["cache_transfer_protocol"]),
        rdma_comm_ports=rdma_ports,
        rdma_gid_index=opts["rdma_gid_index"],
        rdma_traffic_class=opts["rdma_traffic_class"],
        rdma_service_level=opts["rdma_service_level"],
        kv_transfer_port=opts["kv_transfer_port"],
        cluster_token=opts["cluster_token"],
        api_key=opts["api_key"],
        max_request_bytes=opts["max_request_bytes"],
        tool_call_parser=opts["tool_call_parser"],
        served_model_name=opts["served_model_name"],
        pd_fallback=opts["pd_fallback"],
        transfer_timeout_s=opts["transfer_timeout"],
        drain_grace_period_s=opts["drain_grace_period"],
        max_waiting_for_blocks=opts["max_waiting_for_blocks"],
        decode_headroom_tokens=opts["decode_headroom_tokens"],
        decode_prefix_reuse=opts["decode_prefix_reuse"],
        node_id=opts["node_id"],
        pipelined_transfer=not opts["debug_unpipelined_transfer"],
    )


def _check_model(model_dir: str, max_model_len: int | None) -> None:
    """What config.json alone can refuse, before the weights load (minutes on a real model)."""
    from splitwise.engine.config import ModelConfig
    from splitwise.engine.errors import ModelLoadError

    try:
        model = ModelConfig.from_dir(model_dir)
    except ModelLoadError as exc:
        raise click.BadParameter(str(exc).removeprefix("--model: "), param_hint="--model") from None
    if max_model_len is not None and max_model_len > model.max_position_embeddings:
        raise click.BadParameter(
            f"{max_model_len} exceeds the model's context (max_position_embeddings {model.max_position_embeddings})",
            param_hint="--max-model-len",
        )


def _check_tensor_parallel(model_dir: str, tp_size: int, device: str, role: str) -> None:
    """The model must shard over ``tp_size`` ranks; CUDA TP (nccl, one KV buffer per GPU) has
    no per-rank transfer lanes yet, so only a mixed instance may use it."""
    from splitwise.engine.config import ModelConfig
    from splitwise.engine.parallel.layout import TP_FLAG, TPLayout

    model = ModelConfig.from_dir(model_dir)
    if tp_size > 1 and device != "cpu":
        if role != "mixed":
            raise click.BadParameter(
                f"{tp_size} on {device} serves --splitwise-role mixed only: KV transfer from per-GPU "
                "ranks is not built (CPU tensor parallelism serves every role)",
                param_hint=TP_FLAG,
            )
        click.echo(f"warning: {TP_FLAG} {tp_size} on {device} (nccl) has not been run on a GPU yet", err=True)
    try:
        TPLayout(tp_size, model.num_heads, model.num_kv_heads, model.intermediate_size, model.vocab_size)
    except ValueError as exc:
        raise click.BadParameter(str(exc).removeprefix(f"{TP_FLAG}: "), param_hint=TP_FLAG) from None


@click.command("serve", cls=ServeCommand)
@click.option(
    "--model", default=None, help="Local Hugging Face model directory (default: the built-in model)."
)
@click.option(
    "--default-model-size",
    type=click.Choice(["tiny", "small"]),
    default="small",
    show_default=True,
    help="Which built-in model to use when --model is left out.",
)
@click.option("--served-model-name", default=None, help="Model id clients use (default: the directory name).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address of every listener.")
@click.option(
    "--advertise-host",
    default=None,
    help="Address peers connect to (default: --host, or the routable address when --host is 0.0.0.0/::).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="HTTP port (0: a free port, reported).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Separate Prometheus port (default: /metrics on --port).",
)
@click.option(
    "--splitwise-role", type=click.Choice(["mixed", "prefill", "decode"]), default="mixed", show_default=True
)
@scheduler_options
@click.option(
    "--cache-transfer-protocol",
    default="ipc,tcp",
    show_default=True,
    help="Preference list of KV transfer protocols (ipc, rdma, tcp), as in FastDeploy.",
)
@click.option(
    "--rdma-comm-ports",
    default=None,
    help="Comma list of RDMA listener ports (decode): one, or one per tensor-parallel rank as in FastDeploy.",
)
@click.option(
    "--tensor-parallel-size",
    "--tp",
    "--tp-size",
    "tensor_parallel_size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Ranks of this instance: one process each, the model sharded Megatron-style (CPU: gloo).",
)
@click.option(
    "--rdma-gid-index",
    type=click.IntRange(0, 255),
    default=None,
    help="RoCE source GID index (default: env KVCACHE_RDMA_GID_INDEX, NCCL_IB_GID_INDEX, MC_GID_INDEX; "
    "else the first RoCE v2 IPv4 GID).",
)
@click.option(
    "--rdma-traffic-class",
    type=click.IntRange(0, 255),
    default=None,
    help="GRH traffic class of RDMA QPs (RoCE v2: DSCP << 2; default: env NCCL_IB_TC, else 0).",
)
@click.option(
    "--rdma-service-level",
    type=click.IntRange(0, 15),
    default=None,
    help="InfiniBand service level of RDMA QPs (default: env NCCL_IB_SL, else 0).",
)
@click.option(
    "--pd-comm-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="P<->D control channel port.",
)
@click.option(
    "--kv-transfer-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="tcp transport listener port (decode).",
)
@click.option(
    "--cluster-token",
    default=None,
    help="Shared secret for P<->D connections (or env SPLITWISE_CLUSTER_TOKEN; default: a random per-topic token in Redis).",
)
@click.option(
    "--api-key",
    default=None,
    envvar="SPLITWISE_API_KEY",
    help="Require 'Authorization: Bearer KEY' (or env SPLITWISE_API_KEY).",
)
@click.option(
    "--max-request-bytes",
    type=int,
    default=8 * 1024 * 1024,
    show_default=True,
    help="HTTP request bodies larger than this are answered 413 before they are read or parsed.",
)
@click.option(
    "--tool-call-parser",
    type=click.Choice(["hermes", "llama3_json"]),
    default=None,
    help='Parse tool calls out of the text for tool_choice "auto" (Hermes/Qwen <tool_call> or Llama 3 JSON).',
)
@click.option(
    "--pd-fallback",
    type=click.Choice(["local", "fail"]),
    default="local",
    show_default=True,
    help="When the remote prefill fails: prefill on the decode node, or fail the request.",
)
@click.option(
    "--max-waiting-for-blocks",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Decode: requests that may wait for free KV blocks; beyond it a request fails with a retryable error (503).",
)
@click.option(
    "--decode-headroom-tokens",
    type=click.IntRange(min=0),
    default=16,
    show_default=True,
    help="Decode: KV reserved beyond the prompt when a request arrives.",
)
@click.option(
    "--decode-prefix-reuse/--no-decode-prefix-reuse",
    default=True,
    show_default=True,
    help="Decode: reuse the prompt blocks D's prefix cache holds; P computes and ships only the rest.",
)
@click.option(
    "--transfer-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds for a remote prefill + KV transfer.",
)
@click.option(
    "--drain-grace-period",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="SIGTERM drains: seconds running requests may finish before they are handed back "
    "(retryable, re-dispatched); a second SIGTERM stops at once.",
)
@click.option(
    "--max-model-len", type=click.IntRange(min=1), default=None, help="Context length (default: the model's)."
)
@click.option(
    "--block-size",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Tokens per KV block (power of two).",
)
@click.option(
    "--num-kv-blocks",
    type=click.IntRange(min=1),
    default=None,
    help="KV blocks (default: from --kv-cache-memory-gb).",
)
@click.option(
    "--kv-cache-memory-gb", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True
)
@click.option("--max-num-seqs", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--max-num-batched-tokens",
    type=click.IntRange(min=1),
    default=2048,
    show_default=True,
    help="Token budget per step (the prefill chunk size).",
)
@click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=True, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="auto: the checkpoint's torch_dtype on GPU, float32 on CPU (half/float are accepted too).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--torch-threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for torch (default: torch's choice).",
)
@click.option("--node-id", default=None, help="Stable node id (default: role + random suffix).")
# Hidden: a benchmark knob (bench/pd_ttft.py's baseline), not for tests to steer timing.
@click.option(
    "--debug-unpipelined-transfer",
    is_flag=True,
    default=False,
    hidden=True,
    help="Prefill: ship every layer only after the prefill finished (pipelining baseline).",
)
@click.option(
    "--ready-file",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write a JSON line with the ports here once serving.",
)
def serve(**opts: Any) -> None:
    """Serve the OpenAI API from one instance (`--splitwise-role mixed|prefill|decode`).

    Without --scheduler-name, a mixed instance schedules locally (no Redis) and prefill/decode
    instances use the Redis-coordinated splitwise scheduler.
    """
    from splitwise.instance.instance import Instance

    if "scheduler_name" not in _explicit(opts):
        # FastDeploy's default: one mixed instance schedules locally; P/D roles need Redis.
        opts["scheduler_name"] = "local" if opts["splitwise_role"] == "mixed" else "splitwise"
    try:
        config = _instance_config(opts)
    except ValueError as exc:
        flag = str(exc).split(":", 1)[0] if str(exc).startswith("--") else None
        raise click.BadParameter(str(exc), param_hint=flag) from None
    if os.environ.get("KVCACHE_RDMA_NICS") is None and "rdma" in config.cache_transfer_protocols:
        try:
            from rdma.nics import resolve_nics

            nics = resolve_nics(stripe=True)  # a+b: a GPU's requests striped over its nearest NICs
            if nics:
                os.environ["KVCACHE_RDMA_NICS"] = ",".join(nics)
        except Exception as exc:  # noqa: BLE001 - reported; rdma is then skipped with its reason
            click.echo(f"warning: RDMA NIC detection failed: {exc}", err=True)
    if opts["torch_threads"]:
        import torch

        torch.set_num_threads(opts["torch_threads"])
    check_ports_free(config)
    instance = Instance(config)
    try:
        asyncio.run(_run(instance, opts["ready_file"]))
    except Exception as exc:
        line = explain_startup_error(exc, config)
        if line is None:
            raise
        raise StartupError(line) from None
    if instance.fatal_reason is not None:
        click.echo(f"error: {instance.fatal_reason}", err=True)
        sys.exit(1)


def _explicit(opts: dict[str, Any]) -> set[str]:
    ctx = click.get_current_context()
    return {name for name in opts if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE}


async def _run(instance: Any, ready_file: str | None) -> None:
    loop = asyncio.get_running_loop()
    # SIGTERM drains (a second one, or SIGINT, stops at once): splitwise/instance/drain_control.py
    loop.add_signal_handler(signal.SIGINT, instance.request_stop)
    loop.add_signal_handler(signal.SIGTERM, instance.control.on_sigterm)
    try:
        await instance.start()
    except BaseException:
        await instance.close()
        raise
    ports = {
        "node_id": instance.node_id,
        "role": instance.config.role,
        "http_port": instance.ports.http,
        "pd_comm_port": instance.ports.pd_comm,
        "metrics_port": instance.ports.metrics,
        "base_url": f"http://{instance.config.advertised_host}:{instance.ports.http}/v1",
    }
    click.echo(json.dumps(ports), err=False)
    sys.stdout.flush()
    if ready_file:
        tmp = ready_file + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(json.dumps(ports) + "\n")
        os.replace(tmp, ready_file)
    await instance.wait_stopped()
    await instance.close()
