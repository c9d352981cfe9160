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


@pytest.mark.parametrize("n", [64, 577, 1536])
def test_gram_statistic_is_the_symmetric_mean_of_the_float32_block_products_to_the_bit(n):
    """What the Gram statistic used to hold whole (each batch's float32 product made float64 and summed,
    then divided by T and symmetrized) it now builds in place, block by block: the very same numbers."""
    from svdkit.calibration.statistics import Gram, gram_matrix

    batches = [torch.randn(2, 50, n, generator=torch.Generator().manual_seed(n + i)) for i in range(3)]
    stat = Gram(n)
    for x in batches:
        stat.update(x)
    total = None
    for x in batches:
        g = gram_matrix(x.reshape(-1, n).float()).double()
        total = g if total is None else total + g
    mean = total / 300
    assert torch.equal(stat.value(), (mean + mean.T) / 2)
    assert stat.value() is stat.value() and stat.tokens == 300  # finished once, in place


def test_all_finite_checks_every_block():
    from svdkit.calibration.statistics import all_finite

    t = torch.zeros(3000, 7)
    assert all_finite(t) and all_finite(torch.zeros(5))
    t[2999, 6] = float("inf")
    assert not all_finite(t)
