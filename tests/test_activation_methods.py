"""Exact math of the activation-aware family on small matrices: ASVD, FWSVD, NSVD-I and NSVD-II."""

from __future__ import annotations

import pytest
import torch
from conftest import correlated_inputs

from svdkit import SvdkitError
from svdkit.calibration.statistics import LinearStats
from svdkit.methods import get_method, make_config, method_names
from svdkit.methods.linalg import eigen_whitening, robust_cholesky, split_rank

pytestmark = pytest.mark.usefixtures("float64_default")
inputs = correlated_inputs


def stats_of(X: torch.Tensor, **extra) -> LinearStats:
    return LinearStats({"gram": X @ X.T, "mean_abs": X.abs().mean(1), **extra}, tokens=X.shape[1])


def product(method: str, W, stats, k, **opts) -> torch.Tensor:
    m = get_method(method)
    A, B = m.decompose(W, stats, k, make_config(m, opts))
    assert A.shape == (k, W.shape[1]) and B.shape == (W.shape[0], k)
    return B @ A


def truncated(M: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


W = torch.randn(12, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_asvd_with_alpha_zero_is_plain_svd():
    X = inputs(9, 40)
    assert torch.allclose(product("asvd", W, stats_of(X), 4, alpha=0.0), product("svd", W, None, 4), atol=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_asvd_is_the_best_approximation_of_the_scaled_matrix(alpha):
    X = inputs(9, 40)
    s = X.abs().mean(1) ** alpha
    W_ = product("asvd", W, stats_of(X), 4, alpha=alpha)
    assert torch.allclose(W_ * s[None, :], truncated(W * s[None, :], 4), atol=1e-10)
    # it weights the loud channels: their columns are reproduced better than by plain SVD
    loud = s.argmax()
    err_asvd = (W_ - W)[:, loud].norm()
    err_svd = (product("svd", W, None, 4) - W)[:, loud].norm()
    assert err_asvd <= err_svd + 1e-12


def test_asvd_survives_a_dead_channel():
    X = inputs(9, 40)
    X[3] = 0.0
    W_ = product("asvd", W, stats_of(X), 4)
    assert torch.isfinite(W_).all()


@pytest.mark.parametrize("alpha", [-0.1, 2.5, float("nan"), "big", True])
def test_asvd_alpha_out_of_range_is_a_clear_error(alpha):
    with pytest.raises(SvdkitError, match=r"alpha must be a number in \[0, 2\]"):
        make_config(get_method("asvd"), {"alpha": alpha})


def test_fwsvd_weights_rows_by_fisher_importance():
    g = torch.Generator().manual_seed(2)
    importance = torch.rand(12, generator=g) * 10 + 0.1
    stats = LinearStats({"fisher": importance}, tokens=1)
    W_ = product("fwsvd", W, stats, 4)
    r = importance.sqrt()[:, None]
    assert torch.allclose(r * W_, truncated(r * W, 4), atol=1e-10)
    # uniform importance is plain SVD; a zero row weight stays finite
    uniform = LinearStats({"fisher": torch.full((12,), 3.0)}, tokens=1)
    assert torch.allclose(product("fwsvd", W, uniform, 4), product("svd", W, None, 4), atol=1e-10)
    importance[5] = 0.0
    assert torch.isfinite(product("fwsvd", W, LinearStats({"fisher": importance}, tokens=1), 4)).all()


@pytest.mark.parametrize("method", ["nsvd", "nsvd2"])
def test_nsvd_with_whole_rank_in_the_first_stage_is_the_first_stage(method):
    X = inputs(9, 40)
    assert torch.allclose(
        product(method, W, stats_of(X), 5, k1_fraction=1.0), product("svd-llm", W, stats_of(X), 5), atol=1e-8
    )


@pytest.mark.parametrize("method", ["nsvd", "nsvd2"])
def test_nsvd_pair_is_first_stage_plus_residual_svd(method):
    X = inputs(9, 40)
    k = 6
    k1, k2 = split_rank(k, 0.7)
    assert (k1, k2) == (4, 2)
    first = product("svd-llm", W, stats_of(X), k1)
    expected = first + truncated(W - first, k2)
    assert torch.allclose(product(method, W, stats_of(X), k, k1_fraction=0.7), expected, atol=1e-8)


def test_split_rank_default_split():
    assert split_rank(100, 0.95) == (95, 5)
    assert split_rank(1, 0.95) == (1, 0)
    assert split_rank(10, 0.01) == (1, 9)


@pytest.mark.parametrize("method", ["nsvd", "nsvd2"])
@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, "half"])
def test_nsvd_fraction_out_of_range_is_a_clear_error(method, fraction):
    with pytest.raises(SvdkitError, match=r"k1_fraction must be a number in \(0, 1\]"):
        make_config(get_method(method), {"k1_fraction": fraction})


def test_eigen_whitening_of_a_full_rank_gram():
    X = inputs(9, 40)
    S, S_pinv = eigen_whitening(X @ X.T)
    assert torch.allclose(S @ S.T, X @ X.T, atol=1e-8)
    assert torch.allclose(S_pinv @ S, torch.eye(9), atol=1e-8)


def test_nsvd2_first_stage_is_optimal_on_a_rank_deficient_gram():
    """With fewer tokens than channels G is singular: Cholesky needs jitter, the eigen route does not.
    Its error on the calibration inputs is exactly the dropped whitened singular values."""
    X = inputs(9, 5)
    G = X @ X.T
    _, jitter = robust_cholesky(G)
    assert jitter > 0
    W_ = product("nsvd2", W, stats_of(X), 3, k1_fraction=1.0)
    S, _ = eigen_whitening(G)
    dropped = torch.linalg.svdvals(W @ S)[3:]
    assert float(((W - W_) @ X).norm()) == pytest.approx(float(dropped.norm()), rel=1e-6)
    # the nested version still reaches the directions the five tokens never span, through the residual
    assert torch.isfinite(product("nsvd2", W, stats_of(X), 3)).all()


@pytest.mark.parametrize("method", [m for m in method_names() if get_method(m).nested])
def test_nested_methods_slice_to_lower_ranks(method):
    """The flag allocators rely on: rank-k factors are the first k of a higher-rank result."""
    X = inputs(9, 40)
    importance = torch.rand(12, generator=torch.Generator().manual_seed(3)) + 0.5
    stats = stats_of(X, fisher=importance)
    m = get_method(method)
    cfg = make_config(m)
    A, B = m.decompose(W, stats, 7, cfg)
    a, b = m.decompose(W, stats, 3, cfg)
    assert torch.allclose(B[:, :3] @ A[:3], b @ a, atol=1e-10)
