"""ModelRunner on the paged cache: batching, chunking, prefix reuse and layer callbacks.

These compare our runner with itself under different schedules (the HF comparison lives in
test_model_parity.py), so tolerances are tight.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers

from splitwise.engine.config import EngineConfig, ModelConfig
from splitwise.engine.errors import EngineError
from splitwise.engine.kv_cache import KVCache, KVCacheGeometry
from splitwise.engine.layer_ready import ReadyToken
from splitwise.engine.model.attention_metadata import AttentionMetadata
from splitwise.engine.model_runner import (
    ModelRunner,
    ScheduledChunk,
    build_kv_cache,
    kv_geometry,
    num_kv_blocks,
)
from splitwise.engine.sampling_params import SamplingParams
from splitwise.engine.sequence import Sequence

ATOL = 1e-5
BLOCK_SIZE = 4
NUM_BLOCKS = 24
VOCAB = 96


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qwen3")
    config = transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)
    return path


def make_runner(model_dir: Path) -> ModelRunner:
    model_config = ModelConfig.from_dir(model_dir)
    engine_config = EngineConfig(model=str(model_dir), block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS)
    return ModelRunner(model_config, engine_config, build_kv_cache(model_config, engine_config))


@pytest.fixture()
def runner(model_dir: Path) -> ModelRunner:
    return make_runner(model_dir)


def tokens_of(length: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def make_seq(
    tokens: list[int], block_table: list[int], num_computed_tokens: int = 0, req_id: str = "r"
) -> Sequence:
    return Sequence(
        req_id=req_id,
        prompt_token_ids=list(tokens),
        params=SamplingParams(),
        block_table=list(block_table),
        num_computed_tokens=num_computed_tokens,
    )


def full_prefill(runner: ModelRunner, tokens: list[int], block_table: list[int]) -> torch.Tensor:
    """Logits of every position, computed in one chunk."""
    return runner.forward([ScheduledChunk(make_seq(tokens, block_table), len(tokens))], all_tokens=True)


def test_metadata_index_arithmetic_is_exact() -> None:
    # chunk 0: one decode token at position 4 of a sequence with blocks [0, 3];
    # chunk 1: positions 2..4 (3 new tokens) of a sequence with blocks [5, 1];
    # chunk 2: one decode token at position 0 of a sequence with block [2].
    meta = AttentionMetadata.build(
        starts=[4, 2, 0],
        num_new_tokens=[1, 3, 1],
        block_tables=[[0, 3], [5, 1], [2]],
        block_size=4,
        device="cpu",
        num_kv_heads=2,
    )
    # chunk 0 pos 4 -> block 3 slot 0 = 12; chunk 1 pos 2, 3 -> block 5 = 22, 23; pos 4 -> block 1 = 4;
    # chunk 2 pos 0 -> block 2 = 8
    assert meta.slot_mapping.tolist() == [12, 22, 23, 4, 8]
    assert meta.positions.tolist() == [4, 2, 3, 4, 0]

    decode = meta.decode
    assert decode is not None
    assert decode.token_rows == (0, 4)
    assert decode.first_row is None  # rows 0 and 4 are not adjacent: gathered by token_index
    assert decode.token_index.tolist() == [0, 4]
    assert decode.num_blocks == 2 and decode.num_keys == 8  # whole blocks; the tail is masked
    assert decode.block_ids.tolist() == [0, 3, 2, 0]  # chunk 2's table padded with block 0
    # rows of cache.view(-1, bs, D), (chunk, kv head, block) order: block * 2 + head
    assert decode.kv_rows.tolist() == [0, 6, 1, 7, 4, 0, 5, 1]
    # token rows of cache.view(-1, D): block * 2 * 4 + head * 4 + offset (slots 12, 22, 23, 4, 8)
    assert meta.kv_write_rows.tolist() == [[24, 28], [42, 46], [43, 47], [8, 12], [16, 20]]
    assert decode.attn_mask is not None
    assert decode.attn_mask[:, 0, 0].tolist() == [[True] * 5 + [False] * 3, [True] + [False] * 7]

    (prefill,) = meta.prefills
    assert (prefill.first_row, prefill.num_tokens, prefill.num_keys) == (1, 3, 5)
    assert prefill.block_ids is not None and prefill.block_ids.tolist() == [5, 1]
    assert prefill.kv_rows is not None and prefill.kv_rows.tolist() == [10, 2, 11, 3]
    assert prefill.attn_mask is not None
    assert prefill.attn_mask[0, 0].tolist() == [
        [True] * 3 + [False] * 2,  # position 2 sees 0..2
        [True] * 4 + [False] * 1,
        [True] * 5,  # position 4 sees 0..4
    ]


def test_equal_length_decode_and_fresh_prefill_need_no_mask() -> None:
    meta = AttentionMetadata.build(
        starts=[7, 7, 0],
        num_new_tokens=[1, 1, 5],
        block_tables=[[1, 2], [3, 4], [5, 6]],
        block_size=4,
        device="cpu",
        num_kv_heads=2,
    )
    assert meta.decode is not None
    assert meta.decode.first_row == 0 and meta.decode.num_keys == 8
    assert meta.decode.attn_mask is None  # both see keys 0..7, all of their two blocks: no mask
    (prefill,) = meta.prefills
    assert prefill.block_ids is None  # fresh prefill attends to its own k/v, is_causal
    assert prefill.attn_mask is None


def test_sliding_window_masks_decode_and_fresh_prefill() -> None:
    meta = AttentionMetadata.build(
        starts=[5, 0],
        num_new_tokens=[1, 4],
        block_tables=[[1, 2], [3]],
        block_size=4,
        device="cpu",
        num_kv_heads=2,
        sliding_window=3,
    )
    assert meta.decode is not None and meta.decode.attn_mask is not None
    assert meta.decode.attn_mask[0, 0, 0].tolist() == [False] * 3 + [True] * 3 + [False] * 2  # 5 sees 3..5
    (prefill,) = meta.prefills
    assert prefill.attn_mask is not None
    assert prefill.attn_mask[0, 0, 3].tolist() == [False, True, True, True]


def test_paged_decode_equals_full_recomputation(runner: ModelRunner) -> None:
    tokens = tokens_of(11, seed=1)
    expected = full_prefill(runner, tokens, block_table=[20, 21, 22])
    seq = make_seq(tokens, block_table=[8, 2, 15])

    got = [runner.execute([ScheduledChunk(seq, 2)])[0]]
    for pos in range(2, len(tokens)):
        seq.num_computed_tokens = pos
        got.append(runner.execute([ScheduledChunk(seq, 1)])[0])

    assert (torch.stack(got) - expected[1:]).abs().max().item() < ATOL


def test_batch_matches_each_prompt_alone(runner: ModelRunner, model_dir: Path) -> None:
    lengths = [1, 6, 9, 13]
    prompts = [tokens_of(n, seed=10 + i) for i, n in enumerate(lengths)]
    shuffled = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(3)).tolist()
    tables, cursor = [], 0
    for n in lengths:
        num_blocks = -(-(n + 1) // BLOCK_SIZE)  # room for one decode token too
        tables.append(shuffled[cursor : cursor + num_blocks])
        cursor += num_blocks
    alone_runner = make_runner(model_dir)
    alone = [
        full_prefill(alone_runner, p, list(range(len(t))))[-1] for p, t in zip(prompts, tables, strict=True)
    ]
    seqs = [make_seq(p, t, req_id=f"r{i}") for i, (p, t) in enumerate(zip(prompts, tables, strict=True))]

    batched = runner.execute([ScheduledChunk(s, len(s.prompt_token_ids)) for s in seqs])

    assert batched.shape == (len(lengths), VOCAB)
    assert (batched - torch.stack(alone)).abs().max().item() < ATOL

    # Next step mixes decode chunks with a fresh prefill of a new prompt in the same batch.
    for seq in seqs:
        seq.num_computed_tokens = seq.num_tokens
        seq.output_token_ids.append(7)
    new_prompt = tokens_of(5, seed=20)
    new_seq = make_seq(new_prompt, shuffled[cursor : cursor + 2], req_id="new")
    mixed = runner.execute(
        [ScheduledChunk(seqs[0], 1), ScheduledChunk(new_seq, 5), ScheduledChunk(seqs[3], 1)]
    )

    expected = [
        full_prefill(alone_runner, prompts[0] + [7], [0])[-1],
        full_prefill(alone_runner, new_prompt, [0, 1])[-1],
        full_prefill(alone_runner, prompts[3] + [7], [0, 1, 2, 3])[-1],
    ]
    assert (mixed - torch.stack(expected)).abs().max().item() < ATOL


def test_chunked_prefill_equals_unchunked(runner: ModelRunner) -> None:
    tokens = tokens_of(15, seed=4)
    expected = full_prefill(runner, tokens, block_table=[0, 1, 2, 3])
    seq = make_seq(tokens, block_table=[11, 4, 17, 9])

    pieces = []
    for size in (5, 3, 7):  # boundaries deliberately not block-aligned
        pieces.append(runner.forward([ScheduledChunk(seq, size)], all_tokens=True))
        seq.num_computed_tokens += size

    assert (torch.cat(pieces) - expected).abs().max().item() < ATOL


def test_chunk_straddling_prompt_and_output_tokens(runner: ModelRunner) -> None:
    # After preemption a sequence recomputes prompt + already generated tokens in one chunk.
    prompt, generated = tokens_of(6, seed=13), tokens_of(3, seed=14)
    expected = full_prefill(runner, prompt + generated, block_table=[0, 1, 2])
    seq = make_seq(prompt, [7, 16, 3])
    seq.output_token_ids.extend(generated)
    runner.execute([ScheduledChunk(seq, 4)])  # positions 0..3: prompt only
    seq.num_computed_tokens = 4

    got = runner.forward([ScheduledChunk(seq, 5)], all_tokens=True)  # 2 prompt + 3 output tokens

    assert (got - expected[4:]).abs().max().item() < ATOL


def test_prefix_cached_blocks_are_used_as_is(runner: ModelRunner) -> None:
    shared_prefix = tokens_of(8, seed=5)  # exactly 2 blocks
    first = shared_prefix + tokens_of(3, seed=6)
    runner.execute([ScheduledChunk(make_seq(first, [13, 6, 19]), len(first))])
    second = shared_prefix + tokens_of(6, seed=7)
    expected = full_prefill(runner, second, block_table=[0, 1, 2, 3])

    # The second request reuses the first request's two prefix blocks and computes only its suffix.
    seq = make_seq(second, block_table=[13, 6, 22, 2], num_computed_tokens=8)
    got = runner.forward([ScheduledChunk(seq, len(second) - 8)], all_tokens=True)

    assert (got - expected[8:]).abs().max().item() < ATOL


def test_blocks_copied_from_another_cache_continue_decoding(model_dir: Path) -> None:
    prefill_runner, decode_runner = make_runner(model_dir), make_runner(model_dir)
    tokens = tokens_of(7, seed=8)
    prefill_blocks, decode_blocks = [3, 1], [9, 0, 5]
    prefill_runner.execute([ScheduledChunk(make_seq(tokens, prefill_blocks), len(tokens))])
    # What a KV transfer does: copy the blocks, per layer and kind, to other block ids.
    src, dst = prefill_runner.kv_cache.tensor, decode_runner.kv_cache.tensor
    dst[:, :, decode_blocks[:2]] = src[:, :, prefill_blocks]

    seq = make_seq(tokens + [42], decode_blocks, num_computed_tokens=len(tokens))
    got = decode_runner.execute([ScheduledChunk(seq, 1)])

    expected = full_prefill(prefill_runner, tokens + [42], [20, 21])[-1]
    assert (got[0] - expected).abs().max().item() < ATOL


def test_layer_callback_runs_after_each_layers_kv_is_written(runner: ModelRunner) -> None:
    kv = runner.kv_cache
    blocks = [5, 12]
    seq = make_seq(tokens_of(6, seed=9), blocks)
    chunks = [ScheduledChunk(seq, 6)]
    seen: list[tuple[int, bool, bool, bool, bool]] = []

    def on_layer(layer: int, batch: object, ready: ReadyToken) -> None:
        written = bool(kv.k(layer)[blocks].abs().sum() > 0) and bool(kv.v(layer)[blocks].abs().sum() > 0)
        rest_empty = bool((kv.tensor[layer + 1 :] == 0).all())
        seen.append((layer, batch is chunks, written, rest_empty, ready.query()))

    runner.execute(chunks, layer_callback=on_layer)

    num_layers = kv.geometry.num_layers
    # CPU: the layer's writes are done when the callback runs, so its ready token is complete.
    assert seen == [(layer, True, True, True, True) for layer in range(num_layers)]


def test_runner_does_not_mutate_the_sequence(runner: ModelRunner) -> None:
    seq = make_seq(tokens_of(6, seed=11), [1, 2], num_computed_tokens=2)
    before = copy.deepcopy(seq)

    runner.execute([ScheduledChunk(seq, 4)])

    assert seq == before


def test_rejects_chunks_the_block_table_cannot_hold(runner: ModelRunner) -> None:
    seq = make_seq(tokens_of(9, seed=12), [1, 2], req_id="short")  # 9 tokens need 3 blocks
    with pytest.raises(EngineError, match="block table has 2 blocks, 3 needed") as info:
        runner.execute([ScheduledChunk(seq, 9)])
    assert info.value.req_id == "short"

    with pytest.raises(EngineError, match="outside the KV cache"):
        runner.execute([ScheduledChunk(make_seq([1, 2], [NUM_BLOCKS]), 2)])
    with pytest.raises(EngineError, match="sequence has 2 tokens"):
        runner.execute([ScheduledChunk(make_seq([1, 2], [0]), 3)])
    with pytest.raises(EngineError, match="at least one"):
        runner.execute([])
    with pytest.raises(EngineError, match=rf"outside the vocabulary \[0, {VOCAB}\): \[{VOCAB}\]"):
        runner.execute([ScheduledChunk(make_seq([1, VOCAB], [0]), 2)])


def test_kv_geometry_and_block_count(model_dir: Path) -> None:
    model_config = ModelConfig.from_dir(model_dir)
    by_memory = EngineConfig(model=str(model_dir), block_size=8, kv_cache_memory_bytes=1 << 20)
    geometry = kv_geometry(model_config, by_memory, num_blocks=10)
    assert geometry == KVCacheGeometry(
        num_layers=3, num_blocks=10, block_size=8, num_kv_heads=2, head_dim=8, dtype="float32"
    )
    # 2 kinds * 3 layers * 8 slots * 2 heads * 8 dims * 4 bytes = 3072 bytes per block
    assert num_kv_blocks(model_config, by_memory) == (1 << 20) // 3072
    explicit = EngineConfig(model=str(model_dir), block_size=8, num_kv_blocks=7)
    assert num_kv_blocks(model_config, explicit) == 7

    wrong = KVCache(kv_geometry(model_config, EngineConfig(model=str(model_dir), block_size=16), 4))
    with pytest.raises(EngineError, match="does not fit the model"):
        ModelRunner(model_config, by_memory, wrong)
