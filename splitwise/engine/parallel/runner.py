"""Rank 0's model runner: the engine's ``ModelRunner`` for --tensor-parallel-size > 1.

Start-up: KV buffer in shared memory -> spawn ranks 1..N-1 (``launch``) -> join the group ->
load rank 0's shard. Each step: check the chunks -> broadcast the ``StepPlan`` -> run it like
every other rank (``step.run_plan``) -> rank 0's logits go to the sampler. Only rank 0 runs the
scheduler, the sampler and the layer callback (transports); the layer callback of layer L fires
after rank 0 passed layer L's all-reduces, which every rank entered only after writing its
layer-L K/V, so the whole buffer's layer L is in place (shared memory, same host).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from typing import Any

import torch

from splitwise.engine.config import EngineConfig, ModelConfig
from splitwise.engine.errors import EngineError
from splitwise.engine.kv_cache import KVCache, default_shm_name
from splitwise.engine.layer_ready import record_layer_ready
from splitwise.engine.model.attention_metadata import GatherBuffers
from splitwise.engine.model_runner import LayerCallback, ModelRunner, ScheduledChunk, _check_chunk
from splitwise.engine.parallel.errors import RankLostError, TensorParallelError
from splitwise.engine.parallel.group import RankGroup
from splitwise.engine.parallel.kv_view import RankKVView
from splitwise.engine.parallel.launch import RankProcesses
from splitwise.engine.parallel.layout import TPLayout
from splitwise.engine.parallel.loader import load_shard
from splitwise.engine.parallel.messages import RankLaunch, Shutdown, encode
from splitwise.engine.parallel.step import StepContext, plan_of, run_plan
from splitwise.kv_geometry import KVGeometry
from splitwise.logging import get_logger

log = get_logger(__name__)

# A collective inside a forward that takes longer than this means a wedged rank (a crashed one
# is noticed at once: its sockets close). Generous: a first step on a loaded CPU is slow.
COMPUTE_TIMEOUT_S = 300.0
_JOIN_POLL_S = 0.2


def layout_of(model_config: ModelConfig, tp_size: int) -> TPLayout:
    return TPLayout(
        tp_size=tp_size,
        num_heads=model_config.num_heads,
        num_kv_heads=model_config.num_kv_heads,
        intermediate_size=model_config.intermediate_size,
        vocab_size=model_config.vocab_size,
    )


def instance_kv_geometry(
    model_config: ModelConfig, engine_config: EngineConfig, layout: TPLayout, num_blocks: int
) -> KVGeometry:
    """The instance's whole KV buffer: the model's heads (one per rank when replicated)."""
    return KVGeometry(
        dtype=engine_config.dtype,
        block_size=engine_config.block_size,
        num_layers=model_config.num_layers,
        num_kv_heads=layout.num_physical_kv_heads,
        head_dim=model_config.head_dim,
        num_blocks=num_blocks,
        tp_size=layout.tp_size,
        model_kv_heads=model_config.num_kv_heads,
    )


def rank_device(device: str, rank: int) -> torch.device:
    """CPU: every rank on the CPU. CUDA: rank r on GPU (the given index, default 0) + r."""
    base = torch.device(device)
    if base.type != "cuda":
        return base
    return torch.device("cuda", (base.index or 0) + rank)


def rank_kv_cache(
    model_config: ModelConfig, engine_config: EngineConfig, layout: TPLayout, num_blocks: int, rank: int
) -> KVCache:
    """CUDA (written, not yet run on a GPU): each rank's own KV memory on its GPU, its heads only."""
    geometry = dataclasses.replace(
        instance_kv_geometry(model_config, engine_config, layout, num_blocks),
        num_kv_heads=layout.kv_heads_per_rank,
    )
    return KVCache(geometry, device=str(rank_device(engine_config.device, rank)))


def _num_blocks(model_config: ModelConfig, engine_config: EngineConfig, layout: TPLayout) -> int:
    if engine_config.num_kv_blocks is not None:
        return engine_config.num_kv_blocks
    # CPU: one buffer of every head; CUDA: --kv-cache-memory-gb per GPU, each its own heads.
    cuda = torch.device(engine_config.device).type == "cuda"
    return KVGeometry.blocks_for_memory(
        engine_config.kv_cache_memory_bytes,
        num_layers=model_config.num_layers,
        block_size=engine_config.block_size,
        num_kv_heads=layout.kv_heads_per_rank if cuda else layout.num_physical_kv_heads,
        head_dim=model_config.head_dim,
        dtype=engine_config.dtype,
    )


class TPModelRunner(ModelRunner):
    """Owns the instance's KV buffer and the other ranks. ``close()`` stops them."""

    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig) -> None:
        # Not ModelRunner.__init__: that loads the whole model into this process.
        self.model_config = model_config
        self.engine_config = engine_config
        self.layout = layout_of(model_config, engine_config.tensor_parallel_size)
        self.device = rank_device(engine_config.device, 0)
        self.block_size = engine_config.block_size
        self.static_decode = None
        self.gather_buffers = GatherBuffers()
        self.lost: str | None = None
        self.on_rank_lost: Callable[[str], None] | None = None
        num_blocks = _num_blocks(model_config, engine_config, self.layout)
        if self.device.type == "cuda":
            # Each rank keeps its heads on its own GPU (nccl): engine.kv_cache is rank 0's only,
            # so such an instance serves mixed only (serve refuses P/D roles: no per-rank lanes).
            torch.cuda.set_device(self.device)
            shm_name = ""
            self.kv_cache = rank_kv_cache(model_config, engine_config, self.layout, num_blocks, 0)
        else:
            geometry = instance_kv_geometry(model_config, engine_config, self.layout, num_blocks)
            shm_name = engine_config.kv_cache_shm_name or default_shm_name()
            self.kv_cache = KVCache(geometry, device="cpu", shm_name=shm_name)
        self.ranks: RankProcesses | None = None
        try:
            self._start_ranks(shm_name, num_blocks)
        except BaseException:
            self.close()
            raise

    def _start_ranks(self, shm_name: str, num_blocks: int) -> None:
        cfg, world = self.engine_config, self.layout.tp_size
        store = RankGroup.master_store(world, COMPUTE_TIMEOUT_S)
        launches = [
            RankLaunch(
                engine=cfg,
                rank=rank,
                world_size=world,
                store_port=int(store.port),
                kv_shm_name=shm_name,
                num_kv_blocks=num_blocks,
                compute_timeout_s=COMPUTE_TIMEOUT_S,
                num_threads=torch.get_num_threads(),
            )
            for rank in range(1, world)
        ]
        self.ranks = RankProcesses(launches, self._rank_exited)
        self.group = self._join(store, world)
        self.rank_kv: KVCache = (
            self.kv_cache
            if self.device.type == "cuda"
            else RankKVView(self.kv_cache.tensor, self.kv_cache.geometry, self.layout.physical_kv_heads(0))
        )
        self.model = load_shard(
            cfg.model,
            self.model_config,
            self.layout,
            rank=0,
            group=self.group,
            dtype=cfg.torch_dtype,
            device=self.device,
        )
        self._ctx = StepContext(
            self.model,
            self.rank_kv,
            self.block_size,
            self.model_config.sliding_window,
            self.device,
            self.gather_buffers,
        )
        log.info("tensor-parallel group ready", world_size=world, pids=self.ranks.pids)

    def _join(self, store: Any, world: int) -> RankGroup:
        """Rank 0 joins the group, which blocks until every rank has; a rank that exits first
        (bad install, out of memory) fails the start-up at once instead of after the timeout."""
        joined: list[RankGroup | BaseException] = []

        def join() -> None:
            try:
                joined.append(
                    RankGroup(
                        rank=0,
                        world_size=world,
                        store_host="127.0.0.1",
                        store_port=int(store.port),
                        device=self.device,
                        compute_timeout_s=COMPUTE_TIMEOUT_S,
                        store=store,
                    )
                )
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                joined.append(exc)

        thread = threading.Thread(target=join, name="tp-group-join", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(_JOIN_POLL_S)  # a blocked C++ join cannot be interrupted: watch the ranks
            if self.lost is not None and thread.is_alive():
                raise TensorParallelError(f"{self.lost} before the tensor-parallel group formed")
        result = joined[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def _rank_exited(self, rank: int, code: int) -> None:
        self.lost = f"tensor-parallel rank {rank} exited with code {code}"
        if self.on_rank_lost is not None:
            self.on_rank_lost(self.lost)

    def forward(
        self,
        chunks: SequenceOf[ScheduledChunk],
        *,
        layer_callback: LayerCallback | None = None,
        all_tokens: bool = False,
    ) -> torch.Tensor:
        if self.lost is not None:
            raise RankLostError(self.lost)
        if not chunks:
            raise EngineError("execute() needs at least one scheduled chunk")
        for chunk in chunks:
            _check_chunk(chunk, self.block_size, self.kv_cache.geometry.num_blocks)
            self._checked_token_ids(chunk)
        plan = plan_of(chunks, self.block_size, all_tokens=all_tokens)
        self.group.broadcast_bytes(encode(plan))
        callback = (
            None
            if layer_callback is None
            else (lambda layer: layer_callback(layer, chunks, record_layer_ready(self.device)))
        )
        try:
            return run_plan(self._ctx, plan, callback)
        except RankLostError:
            raise
        except RuntimeError as exc:  # a collective error surfacing through torch
            raise TensorParallelError(f"tensor-parallel step failed: {exc}") from None

    @property
    def rank_pids(self) -> dict[int, int]:
        return self.ranks.pids if self.ranks is not None else {}

    def close(self) -> None:
        """Tell the ranks to stop (best effort: some may be gone), reap them, free the buffer."""
        if self.ranks is not None and self.lost is None and hasattr(self, "group"):
            try:
                self.group.broadcast_bytes(encode(Shutdown("instance closing")))
            except TensorParallelError:
                pass
        if self.ranks is not None:
            self.ranks.close()
            self.ranks = None
        self.kv_cache.close()
