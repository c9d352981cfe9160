"""LowRankLinear: y = B (A x) + b."""

from __future__ import annotations

import pytest
import torch

from svdkit import LowRankLinear

pytestmark = pytest.mark.usefixtures("float64_default")


def test_low_rank_linear_computes_b_a_x_plus_bias():
    torch.manual_seed(5)
    A, B, b = torch.randn(3, 7), torch.randn(5, 3), torch.randn(5)
    layer = LowRankLinear.from_factors(A, B, b)
    x = torch.randn(4, 7)
    assert torch.allclose(layer(x), x @ (B @ A).T + b)
    assert layer.rank == 3 and layer.in_features == 7 and layer.out_features == 5
    assert sum(p.numel() for p in layer.parameters()) == 3 * (5 + 7) + 5
    with pytest.raises(ValueError, match="do not chain"):
        LowRankLinear.from_factors(A, torch.randn(5, 4))
