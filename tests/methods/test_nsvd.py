"""NSVD-I and NSVD-II on small matrices: a whitened first stage plus a plain SVD of the residual."""

from __future__ import annotations

import pytest
import torch
from conftest import W, correlated_inputs, product, stats_of, truncated

from svdkit import SvdkitError
from svdkit.methods import get_method, make_config
from svdkit.methods.linalg import split_rank

pytestmark = pytest.mark.usefixtures("float64_default")


@pytest.mark.parametrize("method", ["nsvd", "nsvd2"])
def test_nsvd_with_whole_rank_in_the_first_stage_is_the_first_stage(method):
    X = correlated_inputs(9, 40)
    assert torch.allclose(
        product(method, W, stats_of(X), 5, k1_fraction=1.0), product("svd-llm", W, stats_of(X), 5), atol=1e-8
    )


@pytest.mark.parametrize("method", ["nsvd", "nsvd2"])
def test_nsvd_pair_is_first_stage_plus_residual_svd(method):
    X = correlated_inputs(9, 40)
    k = 6
    k1, k2 = split_rank(k, 0.7)
    assert (k1, k2) == (4, 2)
    first = product("svd-llm", W, stats_of(X), k1)
    expected = first + truncated(W - first, k2)
    assert torch.allclose(product(method, W, stats_of(X), k, k1_fraction=0.7), expected, atol=1e-8)


@pytest.mark.parametrize("method", ["nsvd", "nsvd2"])
@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, "half"])
def test_nsvd_fraction_out_of_range_is_a_clear_error(method, fraction):
    with pytest.raises(SvdkitError, match=r"k1_fraction must be a number in \(0, 1\]"):
        make_config(get_method(method), {"k1_fraction": fraction})
