from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splitwise.engine.model.packed_linear import PackedLinear, pack_linears, pack_weight

needs_mkldnn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")


@needs_mkldnn
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_packed_bf16_linear_is_bit_identical_to_f_linear(rows: int) -> None:
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(96, 160, bias=True).to(torch.bfloat16)
    x = torch.randn(rows, 96, generator=g).to(torch.bfloat16)
    packed = PackedLinear.wrap(layer)
    assert packed.packed is not None
    with torch.inference_mode():
        assert torch.equal(packed(x), F.linear(x, layer.weight, layer.bias))


def test_only_bf16_cpu_weights_are_packed() -> None:
    assert pack_weight(torch.zeros(4, 4)) is None  # fp32: packing is not bit-exact there
    assert pack_weight(torch.zeros(4, 4, dtype=torch.float16)) is None


@needs_mkldnn
def test_pack_linears_keeps_parameters_and_skips_other_linear_types() -> None:
    class Sharded(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(8, 8), Sharded(8, 8)).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[0].weight

    assert pack_linears(model) == 1
    assert type(model[0]) is PackedLinear and model[0].weight is weight
    assert type(model[1]) is Sharded  # another linear type (e.g. tensor parallel) is left alone
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
