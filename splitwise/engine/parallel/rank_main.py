"""Entry point of ranks 1..N-1: ``python -m splitwise.engine.parallel.rank_main`` (spawned by
``launch.RankProcesses``). The process's error boundary: any failure exits non-zero, which rank 0
notices (its collectives break, its monitor sees the exit)."""

from __future__ import annotations

import os
import sys
import threading

import torch

from splitwise.engine.config import ModelConfig
from splitwise.engine.kv_cache import KVCache
from splitwise.engine.model.attention_metadata import GatherBuffers
from splitwise.engine.parallel.group import RankGroup
from splitwise.engine.parallel.kv_view import RankKVView
from splitwise.engine.parallel.launch import LENGTH
from splitwise.engine.parallel.layout import TPLayout
from splitwise.engine.parallel.loader import load_shard
from splitwise.engine.parallel.messages import RankLaunch, Shutdown, decode_launch, decode_rank_message
from splitwise.engine.parallel.runner import instance_kv_geometry, layout_of, rank_device, rank_kv_cache
from splitwise.engine.parallel.step import StepContext, run_plan
from splitwise.logging import configure_logging, get_logger

log = get_logger("splitwise.engine.parallel")


def _read_launch() -> RankLaunch:
    stdin = sys.stdin.buffer
    header = stdin.read(LENGTH.size)
    if len(header) != LENGTH.size:
        raise SystemExit("rank_main: no launch message on stdin (start ranks through RankProcesses)")
    (length,) = LENGTH.unpack(header)
    return decode_launch(stdin.read(length))


def _watch_parent() -> None:
    """stdin EOF = rank 0's process is gone (or closed our pipe to stop us): exit at once, even
    from inside a blocked collective."""
    sys.stdin.buffer.read()
    os._exit(0)


def serve(launch: RankLaunch) -> None:
    cfg = launch.engine
    torch.set_num_threads(launch.num_threads)
    device = rank_device(cfg.device, launch.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model_config = ModelConfig.from_dir(cfg.model)
    layout: TPLayout = layout_of(model_config, launch.world_size)
    group = RankGroup(
        rank=launch.rank,
        world_size=launch.world_size,
        store_host="127.0.0.1",
        store_port=launch.store_port,
        device=device,
        compute_timeout_s=launch.compute_timeout_s,
    )
    kv: KVCache
    if launch.kv_shm_name:  # CPU: the instance's one buffer, this rank's head slice
        geometry = instance_kv_geometry(model_config, cfg, layout, launch.num_kv_blocks)
        kv = RankKVView.map_shared(launch.kv_shm_name, geometry, layout.physical_kv_heads(launch.rank))
    else:  # CUDA: its own heads on its own GPU
        kv = rank_kv_cache(model_config, cfg, layout, launch.num_kv_blocks, launch.rank)
    model = load_shard(
        cfg.model, model_config, layout, rank=launch.rank, group=group, dtype=cfg.torch_dtype, device=device
    )
    ctx = StepContext(model, kv, cfg.block_size, model_config.sliding_window, device, GatherBuffers())
    log.info("tensor-parallel rank ready", rank=launch.rank, world_size=launch.world_size)
    while True:
        message = decode_rank_message(group.broadcast_bytes(None))
        if isinstance(message, Shutdown):
            break
        run_plan(ctx, message)
    kv.close()


def main() -> None:
    configure_logging()
    launch = _read_launch()
    threading.Thread(target=_watch_parent, name="parent-watchdog", daemon=True).start()
    try:
        serve(launch)
    except Exception as exc:  # noqa: BLE001 - the rank's error boundary: report and exit non-zero
        log.error("tensor-parallel rank failed", rank=launch.rank, error=str(exc))
        os._exit(1)
    os._exit(0)


if __name__ == "__main__":
    main()
