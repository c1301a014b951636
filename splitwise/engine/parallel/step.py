"""One forward pass from a ``StepPlan``: the same code on every rank, so every rank issues the
same collectives in the same order (rank 0 builds the plan from its scheduled chunks)."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

import torch

from splitwise.engine.kv_cache import KVCache
from splitwise.engine.model.attention_metadata import AttentionMetadata, GatherBuffers
from splitwise.engine.model.llama import CausalLM
from splitwise.engine.model_runner import ScheduledChunk, _new_token_ids, _num_blocks_needed
from splitwise.engine.parallel.messages import PlanChunk, StepPlan


def plan_of(chunks: SequenceOf[ScheduledChunk], block_size: int, *, all_tokens: bool) -> StepPlan:
    return StepPlan(
        chunks=[
            PlanChunk(
                start=c.seq.num_computed_tokens,
                token_ids=list(_new_token_ids(c)),
                block_table=list(c.seq.block_table[: _num_blocks_needed(c, block_size)]),
            )
            for c in chunks
        ],
        all_tokens=all_tokens,
    )


@dataclass
class StepContext:
    """What a rank needs besides the plan; fixed at start-up."""

    model: CausalLM
    kv_cache: KVCache  # CPU: the instance's KV buffer, of which this rank computes ``kv_heads``
    block_size: int
    sliding_window: int | None
    device: torch.device
    buffers: GatherBuffers


def run_plan(
    ctx: StepContext, plan: StepPlan, layer_callback: Callable[[int], None] | None = None
) -> torch.Tensor:
    """float32 logits, rows as ``ModelRunner.forward`` returns them (every rank gets them all)."""
    chunks = plan.chunks
    # Decode chunks first, as ModelRunner does: their queries are then rows 0..G-1 (views).
    order = [b for b, c in enumerate(chunks) if len(c.token_ids) == 1]
    order += [b for b, c in enumerate(chunks) if len(c.token_ids) != 1]
    token_ids: list[int] = []
    row_of: dict[int, int] = {}
    for b in order:
        row_of[b] = len(token_ids)
        token_ids.extend(chunks[b].token_ids)
    heads = ctx.kv_cache.kv_heads
    meta = AttentionMetadata.build(
        starts=[chunks[b].start for b in order],
        num_new_tokens=[len(chunks[b].token_ids) for b in order],
        block_tables=[chunks[b].block_table for b in order],
        block_size=ctx.block_size,
        device=ctx.device,
        # CPU: this rank's heads of the instance's shared buffer; CUDA: all of its own cache.
        num_kv_heads=len(heads),
        first_kv_head=heads.start,
        cache_kv_heads=ctx.kv_cache.geometry.num_kv_heads,
        sliding_window=ctx.sliding_window,
        buffers=ctx.buffers,
    )
    if plan.all_tokens:
        rows = [r for b, c in enumerate(chunks) for r in range(row_of[b], row_of[b] + len(c.token_ids))]
    else:
        rows = [row_of[b] + len(c.token_ids) - 1 for b, c in enumerate(chunks)]
    input_ids = torch.tensor(token_ids, dtype=torch.int64).to(ctx.device)
    logits_indices = torch.tensor(rows, dtype=torch.int64).to(ctx.device)
    with torch.inference_mode():
        logits: torch.Tensor = ctx.model(input_ids, meta, ctx.kv_cache, logits_indices, layer_callback)
        return logits
