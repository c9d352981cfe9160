"""A layer's statistics: non-finite values refused, the blocked Gram matrix exact."""

from __future__ import annotations

import pytest
import torch

from svdkit import SvdkitError
from svdkit.calibration.statistics import LinearStats

pytestmark = pytest.mark.usefixtures("float64_default")


def test_statistics_with_nan_are_refused_naming_the_module():
    with pytest.raises(SvdkitError, match="model.layers.3.mlp.up_proj"):
        LinearStats({"gram": torch.tensor([[float("nan")]])}, 1, module="model.layers.3.mlp.up_proj")


@pytest.mark.parametrize("n", [5, 200, 577, 1536])
def test_block_triangular_gram_equals_the_full_product(n):
    from svdkit.calibration.statistics import gram_matrix

    x = torch.randn(300, n, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(gram_matrix(x), x.T @ x, rtol=1e-12, atol=1e-9)
