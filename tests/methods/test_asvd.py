"""ASVD on small matrices: the best approximation of the activation-scaled matrix, and its alpha option."""

from __future__ import annotations

import pytest
import torch
from conftest import W, correlated_inputs, product, stats_of, truncated

from svdkit import SvdkitError
from svdkit.methods import get_method, make_config

pytestmark = pytest.mark.usefixtures("float64_default")


def test_asvd_with_alpha_zero_is_plain_svd():
    X = correlated_inputs(9, 40)
    assert torch.allclose(product("asvd", W, stats_of(X), 4, alpha=0.0), product("svd", W, None, 4), atol=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_asvd_is_the_best_approximation_of_the_scaled_matrix(alpha):
    X = correlated_inputs(9, 40)
    s = X.abs().mean(1) ** alpha
    W_ = product("asvd", W, stats_of(X), 4, alpha=alpha)
    assert torch.allclose(W_ * s[None, :], truncated(W * s[None, :], 4), atol=1e-10)
    # it weights the loud channels: their columns are reproduced better than by plain SVD
    loud = s.argmax()
    err_asvd = (W_ - W)[:, loud].norm()
    err_svd = (product("svd", W, None, 4) - W)[:, loud].norm()
    assert err_asvd <= err_svd + 1e-12


def test_asvd_survives_a_dead_channel():
    X = correlated_inputs(9, 40)
    X[3] = 0.0
    W_ = product("asvd", W, stats_of(X), 4)
    assert torch.isfinite(W_).all()


@pytest.mark.parametrize("alpha", [-0.1, 2.5, float("nan"), "big", True])
def test_asvd_alpha_out_of_range_is_a_clear_error(alpha):
    with pytest.raises(SvdkitError, match=r"alpha must be a number in \[0, 2\]"):
        make_config(get_method("asvd"), {"alpha": alpha})
