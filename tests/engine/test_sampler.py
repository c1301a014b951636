from __future__ import annotations

import pytest
import torch

from splitwise.engine.sampler import Sampler, derive_seed
from splitwise.engine.sampling_params import SamplingParams

VOCAB = 32


def random_logits(num_rows: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, VOCAB, generator=generator) * 3


def test_greedy_is_argmax_with_raw_logprobs() -> None:
    logits = random_logits(4)
    out = Sampler().sample(logits, [SamplingParams(temperature=0.0)] * 4, [0] * 4)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    expected = torch.log_softmax(logits, dim=-1).gather(1, logits.argmax(dim=-1, keepdim=True)).squeeze(1)
    assert out.logprobs == pytest.approx(expected.tolist())


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=1),
        SamplingParams(top_k=1, seed=3),
        SamplingParams(top_p=1e-6),
        SamplingParams(temperature=0.7, top_p=1e-6, seed=5),
    ],
)
def test_top_k_one_and_tiny_top_p_are_greedy(params: SamplingParams) -> None:
    logits = random_logits(6, seed=1)
    out = Sampler(seed=9).sample(logits, [params] * 6, list(range(6)))
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_logprob_is_under_the_raw_distribution_whatever_the_settings() -> None:
    logits = random_logits(3, seed=2)
    params = [
        SamplingParams(temperature=0.3, top_k=5),
        SamplingParams(temperature=2.0),
        SamplingParams(top_p=0.5),
    ]
    out = Sampler().sample(logits, params, [0, 0, 0])
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs == pytest.approx([raw[i, t].item() for i, t in enumerate(out.token_ids)])


def test_same_seed_gives_same_tokens_in_any_batch() -> None:
    target = random_logits(1, seed=3)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    alone = [Sampler(seed=0).sample(target, [seeded], [i]).token_ids[0] for i in range(20)]
    others = random_logits(3, seed=4)
    batch = torch.cat([others[:2], target, others[2:]])
    mixed_params = [SamplingParams(top_k=3), SamplingParams(temperature=0.0), seeded, SamplingParams()]
    in_batch = [Sampler(seed=77).sample(batch, mixed_params, [5, 5, i, 5]).token_ids[2] for i in range(20)]
    assert in_batch == alone
    assert len(set(alone)) > 1  # successive output indices draw fresh noise


def test_different_seeds_differ() -> None:
    logits = torch.zeros(1, VOCAB)  # uniform: any two seeds agreeing on 10 draws is ~impossible
    draws = {
        seed: [Sampler().sample(logits, [SamplingParams(seed=seed)], [i]).token_ids[0] for i in range(10)]
        for seed in (1, 2)
    }
    assert draws[1] != draws[2]


def test_top_k_samples_stay_in_the_top_k_set() -> None:
    logits = random_logits(1, seed=5).expand(400, VOCAB).contiguous()
    out = Sampler(seed=1).sample(logits, [SamplingParams(top_k=3)] * 400, [0] * 400)
    top3 = set(logits[0].topk(3).indices.tolist())
    assert set(out.token_ids) == top3


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.1, 0.1])
    logits = probs.log().expand(400, 4).contiguous()
    out = Sampler(seed=1).sample(logits, [SamplingParams(top_p=0.7)] * 400, [0] * 400)
    assert set(out.token_ids) == {0, 1}


def test_sampling_frequencies_follow_the_distribution() -> None:
    logits = torch.tensor([0.75, 0.25]).log().expand(4000, 2).contiguous()
    out = Sampler(seed=123).sample(logits, [SamplingParams()] * 4000, [0] * 4000)
    share_of_zero = out.token_ids.count(0) / 4000
    assert 0.72 < share_of_zero < 0.78


def test_low_temperature_concentrates_on_the_argmax() -> None:
    logits = random_logits(8, seed=6)
    out = Sampler().sample(logits, [SamplingParams(temperature=1e-4)] * 8, [0] * 8)
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_mismatched_inputs_are_rejected() -> None:
    with pytest.raises(ValueError):
        Sampler().sample(random_logits(2), [SamplingParams()], [0])


def test_derive_seed_is_deterministic_and_index_dependent() -> None:
    assert derive_seed(7, 3) == derive_seed(7, 3)
    assert derive_seed(7, 3) != derive_seed(7, 4)
    assert 0 <= derive_seed(7, 3) < 2**63
