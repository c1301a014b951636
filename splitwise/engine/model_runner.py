"""The model runner: turns a batch of scheduled chunks into last-token logits.

The engine loop calls ``execute`` once per step with what the scheduler picked. The runner reads
each chunk's sequence (tokens, progress, block table), writes the new tokens' K/V into the paged
cache and returns the logits of each chunk's last new token. It never mutates a sequence: advancing
``num_computed_tokens`` and appending sampled tokens is the engine's job.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

import torch

from splitwise.engine.config import EngineConfig, ModelConfig
from splitwise.engine.cpu_malloc import reuse_freed_memory
from splitwise.engine.errors import EngineError
from splitwise.engine.kv_cache import KVCache, KVCacheGeometry
from splitwise.engine.layer_ready import ReadyToken, record_layer_ready
from splitwise.engine.loader import load_model
from splitwise.engine.model.attention import decode_bias_dtype
from splitwise.engine.model.attention_metadata import AttentionMetadata, GatherBuffers
from splitwise.engine.model.llama import CausalLM
from splitwise.engine.model.packed_linear import pack_linears
from splitwise.engine.sequence import Sequence
from splitwise.engine.static_decode import DecodeInput, StaticDecodeStep


@dataclass(frozen=True)
class ScheduledChunk:
    """One sequence's share of a step: compute ``num_new_tokens`` tokens starting at
    ``seq.num_computed_tokens``. The runner reads ``seq`` and never mutates it."""

    seq: Sequence
    num_new_tokens: int


# (layer index, the batch, ready token): called after that layer's KV writes for the whole batch
# were issued and before the next layer runs (layer-wise KV streaming hooks in here); ``ready``
# completes once those writes ran (a CUDA event; complete on CPU: see engine.layer_ready).
LayerCallback = Callable[[int, SequenceOf[ScheduledChunk], ReadyToken], None]


def kv_geometry(model_config: ModelConfig, engine_config: EngineConfig, num_blocks: int) -> KVCacheGeometry:
    """The KV cache shape this model needs, with ``num_blocks`` blocks."""
    return KVCacheGeometry(
        num_layers=model_config.num_layers,
        num_blocks=num_blocks,
        block_size=engine_config.block_size,
        num_kv_heads=model_config.num_kv_heads,
        head_dim=model_config.head_dim,
        dtype=engine_config.dtype,
    )


def num_kv_blocks(model_config: ModelConfig, engine_config: EngineConfig) -> int:
    """--num-kv-blocks if given, else as many blocks as fit in --kv-cache-memory-bytes."""
    if engine_config.num_kv_blocks is not None:
        return engine_config.num_kv_blocks
    return KVCacheGeometry.blocks_for_memory(
        engine_config.kv_cache_memory_bytes,
        num_layers=model_config.num_layers,
        block_size=engine_config.block_size,
        num_kv_heads=model_config.num_kv_heads,
        head_dim=model_config.head_dim,
        dtype=engine_config.dtype,
    )


def build_kv_cache(model_config: ModelConfig, engine_config: EngineConfig) -> KVCache:
    """Allocate the engine's KV cache (in shared memory when --kv-cache-shm-name is set)."""
    geometry = kv_geometry(model_config, engine_config, num_kv_blocks(model_config, engine_config))
    return KVCache(geometry, device=engine_config.device, shm_name=engine_config.kv_cache_shm_name)


class ModelRunner:
    """Owns the loaded model; runs one batched forward per ``execute``.

    Called by the engine loop only (single thread). ``kv_cache`` stays owned by the caller; the
    runner writes into it in place.
    """

    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig, kv_cache: KVCache) -> None:
        expected = kv_geometry(model_config, engine_config, kv_cache.geometry.num_blocks)
        if kv_cache.geometry != expected:
            raise EngineError(
                f"KV cache geometry {kv_cache.geometry} does not fit the model (expected {expected})"
            )
        self.model_config = model_config
        self.engine_config = engine_config
        self.kv_cache = kv_cache
        self.device = torch.device(engine_config.device)
        if self.device.type == "cpu":
            reuse_freed_memory()  # big per-step tensors would be page-faulted in every step
        self.block_size = engine_config.block_size
        self.gather_buffers = GatherBuffers()
        self.model: CausalLM = load_model(
            engine_config.model, model_config, dtype=engine_config.torch_dtype, device=self.device
        )
        pack_linears(self.model)  # bf16 on CPU: oneDNN-packed weights (model/packed_linear.py)
        # CUDA: all-decode steps replay a captured graph per bucket. CPU: the dynamic path (the
        # padded static step measured no faster there; it is tested on CPU without capture).
        self.static_decode = (
            StaticDecodeStep(self.model, kv_cache, self.block_size, use_graphs=True)
            if self.device.type == "cuda" and engine_config.cuda_graphs
            else None
        )

    def execute(
        self, chunks: SequenceOf[ScheduledChunk], layer_callback: LayerCallback | None = None
    ) -> torch.Tensor:
        """float32 logits [len(chunks), vocab] of each chunk's last new token."""
        return self.forward(chunks, layer_callback=layer_callback, all_tokens=False)

    def forward(
        self,
        chunks: SequenceOf[ScheduledChunk],
        *,
        layer_callback: LayerCallback | None = None,
        all_tokens: bool = False,
    ) -> torch.Tensor:
        """Like ``execute``; with ``all_tokens`` the logits of every new token, chunk after chunk
        ([sum(num_new_tokens), vocab]) — for prompt logprobs and parity tests."""
        if not chunks:
            raise EngineError("execute() needs at least one scheduled chunk")
        for chunk in chunks:
            _check_chunk(chunk, self.block_size, self.kv_cache.geometry.num_blocks)
        if (
            self.static_decode is not None
            and not all_tokens
            and StaticDecodeStep.can_run(
                [c.num_new_tokens for c in chunks],
                layer_callback is not None,
                self.model_config.sliding_window,
            )
        ):
            return self.static_decode.run([self._decode_input(c) for c in chunks])
        order = _decode_first(chunks)
        input_ids, meta, first_rows = self._prepare([chunks[b] for b in order])
        row_of = dict(zip(order, first_rows, strict=True))  # chunk index -> its first flat row
        if all_tokens:
            rows = [r for b, c in enumerate(chunks) for r in range(row_of[b], row_of[b] + c.num_new_tokens)]
        else:
            rows = [row_of[b] + c.num_new_tokens - 1 for b, c in enumerate(chunks)]  # last new token
        logits_indices = torch.tensor(rows, dtype=torch.int64).to(self.device)
        # The token is recorded here, on the compute thread right after layer L was issued: on CUDA
        # the callback fires when the kernels are queued, so transports must wait for it (#11).
        callback = (
            None
            if layer_callback is None
            else (lambda layer: layer_callback(layer, chunks, record_layer_ready(self.device)))
        )
        with torch.inference_mode():
            logits: torch.Tensor = self.model(input_ids, meta, self.kv_cache, logits_indices, callback)
            return logits

    def _prepare(
        self, chunks: SequenceOf[ScheduledChunk]
    ) -> tuple[torch.Tensor, AttentionMetadata, list[int]]:
        """Flat input ids, the step's attention metadata and each chunk's first flat row."""
        token_ids: list[int] = []
        first_rows: list[int] = []
        for chunk in chunks:
            first_rows.append(len(token_ids))
            token_ids.extend(self._checked_token_ids(chunk))
        meta = AttentionMetadata.build(
            starts=[c.seq.num_computed_tokens for c in chunks],
            num_new_tokens=[c.num_new_tokens for c in chunks],
            # Blocks past the chunk's end (allocated ahead) hold nothing it may see: leave them out.
            block_tables=[c.seq.block_table[: _num_blocks_needed(c, self.block_size)] for c in chunks],
            block_size=self.block_size,
            device=self.device,
            num_kv_heads=self.model_config.num_kv_heads,
            sliding_window=self.model_config.sliding_window,
            buffers=self.gather_buffers,
            bias_dtype=decode_bias_dtype(self.engine_config.torch_dtype)
            if self.device.type == "cpu"
            else None,
        )
        return torch.tensor(token_ids, dtype=torch.int64).to(self.device), meta, first_rows

    def _checked_token_ids(self, chunk: ScheduledChunk) -> list[int]:
        new_ids = _new_token_ids(chunk)
        if any(not 0 <= t < self.model_config.vocab_size for t in new_ids):
            raise EngineError(
                f"token ids outside the vocabulary [0, {self.model_config.vocab_size}): "
                f"{[t for t in new_ids if not 0 <= t < self.model_config.vocab_size][:5]}",
                req_id=chunk.seq.req_id,
            )
        return new_ids

    def _decode_input(self, chunk: ScheduledChunk) -> DecodeInput:
        (token_id,) = self._checked_token_ids(chunk)
        seq = chunk.seq
        return DecodeInput(
            token_id, seq.num_computed_tokens, seq.block_table[: _num_blocks_needed(chunk, self.block_size)]
        )


def _decode_first(chunks: SequenceOf[ScheduledChunk]) -> list[int]:
    """Chunk indices, decode chunks (one token) first: their queries are then rows 0..G-1, so
    attention reads and writes them as views, with no index_select/index_copy."""
    decode = [b for b, c in enumerate(chunks) if c.num_new_tokens == 1]
    return decode + [b for b, c in enumerate(chunks) if c.num_new_tokens != 1]


def _new_token_ids(chunk: ScheduledChunk) -> list[int]:
    """seq.token_ids[start : start + n] without concatenating prompt and output every step."""
    seq, start = chunk.seq, chunk.seq.num_computed_tokens
    end = start + chunk.num_new_tokens
    num_prompt = seq.num_prompt_tokens
    if end <= num_prompt:
        return seq.prompt_token_ids[start:end]
    if start >= num_prompt:
        return seq.output_token_ids[start - num_prompt : end - num_prompt]
    return seq.token_ids[start:end]  # a chunk straddling prompt and output (recompute after preemption)


def _check_chunk(chunk: ScheduledChunk, block_size: int, num_blocks: int) -> None:
    """Scheduler/block-manager bugs surface here with the request named, not as index errors."""
    seq = chunk.seq
    end = seq.num_computed_tokens + chunk.num_new_tokens
    if chunk.num_new_tokens < 1 or end > seq.num_tokens:
        raise EngineError(
            f"chunk asks for tokens [{seq.num_computed_tokens}, {end}) but the sequence has "
            f"{seq.num_tokens} tokens",
            req_id=seq.req_id,
        )
    needed_blocks = _num_blocks_needed(chunk, block_size)
    if len(seq.block_table) < needed_blocks:
        raise EngineError(
            f"block table has {len(seq.block_table)} blocks, {needed_blocks} needed for {end} tokens",
            req_id=seq.req_id,
        )
    bad = [b for b in seq.block_table[:needed_blocks] if not 0 <= b < num_blocks]
    if bad:
        raise EngineError(
            f"block ids {bad} are outside the KV cache (0..{num_blocks - 1})", req_id=seq.req_id
        )


def _num_blocks_needed(chunk: ScheduledChunk, block_size: int) -> int:
    end = chunk.seq.num_computed_tokens + chunk.num_new_tokens
    return -(-end // block_size)  # ceil
