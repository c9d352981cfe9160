"""NSVD-II's eigen-whitened first stage on a rank-deficient Gram matrix."""

from __future__ import annotations

import pytest
import torch
from conftest import W, correlated_inputs, product, stats_of

from svdkit.methods.linalg import eigen_whitening, robust_cholesky

pytestmark = pytest.mark.usefixtures("float64_default")


def test_nsvd2_first_stage_is_optimal_on_a_rank_deficient_gram():
    """With fewer tokens than channels G is singular: Cholesky needs jitter, the eigen route does not.
    Its error on the calibration inputs is exactly the dropped whitened singular values."""
    X = correlated_inputs(9, 5)
    G = X @ X.T
    _, jitter = robust_cholesky(G)
    assert jitter > 0
    W_ = product("nsvd2", W, stats_of(X), 3, k1_fraction=1.0)
    S, _ = eigen_whitening(G)
    dropped = torch.linalg.svdvals(W @ S)[3:]
    assert float(((W - W_) @ X).norm()) == pytest.approx(float(dropped.norm()), rel=1e-6)
    # the nested version still reaches the directions the five tokens never span, through the residual
    assert torch.isfinite(product("nsvd2", W, stats_of(X), 3)).all()
