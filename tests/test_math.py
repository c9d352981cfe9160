"""Exact-math tests on small matrices: rank rule, break-even, SVD, SVD-LLM's whitening identity."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import correlated_inputs

from svdkit import LowRankLinear, SvdkitError
from svdkit.allocators.uniform import allocate_uniform
from svdkit.calibration.statistics import LinearStats
from svdkit.core.ranks import break_even_rank, check_ratio, rank_for_ratio, saves_parameters
from svdkit.methods import get_method, make_config
from svdkit.methods.linalg import robust_cholesky

pytestmark = pytest.mark.usefixtures("float64_default")


def run(method: str, W, X, k, **opts):
    stats = LinearStats({"gram": X @ X.T}, tokens=X.shape[1]) if X is not None else None
    m = get_method(method)
    return m.decompose(W, stats, k, make_config(m, opts))


@pytest.mark.parametrize(
    "m,n,ratio,expected",
    [
        (576, 576, 0.2, 230),
        (192, 576, 0.4, 86),
        (1536, 576, 0.6, 167),
        (576, 1536, 0.2, 335),
        (10, 10, 0.99, 1),
        (300, 300, 0.3, 105),
    ],  # 300 * 300 * 0.7 / 600 is exactly 105, though float arithmetic gives 104.99999
)
def test_rank_for_ratio_formula(m, n, ratio, expected):
    assert rank_for_ratio(m, n, ratio) == expected


def test_break_even_and_dense_fallback():
    assert break_even_rank(6, 3) == 2
    assert saves_parameters(6, 3, 1) and not saves_parameters(6, 3, 2)
    # a 1 x 8 row: even rank 1 costs 9 > 8 numbers, so it stays dense
    ranks = allocate_uniform({"row": (1, 8), "square": (8, 8)}, 0.5)
    assert ranks == {"row": None, "square": 2}


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_ratio_outside_open_interval_is_refused(bad):
    with pytest.raises(SvdkitError, match="strictly between 0 and 1"):
        check_ratio(bad)


def test_plain_svd_is_eckart_young():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 9, generator=g)
    S = torch.linalg.svdvals(W)
    A, B = run("svd", W, None, 4)
    assert A.shape == (4, 9) and B.shape == (12, 4)
    assert torch.linalg.norm(W - B @ A) == pytest.approx(float(S[4:].square().sum().sqrt()), rel=1e-10)
    # sqrt(S) is split evenly: both factors carry the same singular values
    assert torch.allclose(torch.linalg.svdvals(A), S[:4].sqrt())
    assert torch.allclose(torch.linalg.svdvals(B), S[:4].sqrt())
    A, B = run("svd", W, None, 9)
    assert torch.allclose(B @ A, W)


def test_svd_llm_whitening_identity():
    """||(W - B A) X||_F equals the norm of the dropped singular values of W L, with X X^T = L L^T."""
    n, m, T, k = 10, 14, 200, 4
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(2))
    X = correlated_inputs(n, T)
    A, B = run("svd-llm", W, X, k)
    L = torch.linalg.cholesky(X @ X.T)
    dropped = torch.linalg.svdvals(W @ L)[k:]
    assert torch.linalg.norm((W - B @ A) @ X) == pytest.approx(float(dropped.square().sum().sqrt()), rel=1e-8)


def test_svd_llm_beats_plain_svd_on_the_calibration_outputs():
    n, m, T = 16, 20, 300
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(3))
    X = correlated_inputs(n, T, seed=3)
    for k in (2, 5, 10):
        A1, B1 = run("svd-llm", W, X, k)
        A0, B0 = run("svd", W, None, k)
        assert torch.linalg.norm((W - B1 @ A1) @ X) < torch.linalg.norm((W - B0 @ A0) @ X)


def test_svd_llm_survives_a_singular_gram_matrix():
    """Fewer tokens than channels: X X^T is singular, Cholesky needs jitter, the result stays near-optimal."""
    n, m, T, k = 12, 8, 5, 3
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(4))
    X = correlated_inputs(n, T, seed=4)
    A, B = run("svd-llm", W, X, k)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    # the best rank-k output error on X: drop singular values of W X beyond k
    best = float(torch.linalg.svdvals(W @ X)[k:].square().sum().sqrt())
    assert float(torch.linalg.norm((W - B @ A) @ X)) == pytest.approx(best, rel=1e-3, abs=1e-6)


def test_robust_cholesky_on_indefinite_and_zero_matrices():
    G = torch.diag(torch.tensor([4.0, 1.0, -0.5]))
    L, jitter = robust_cholesky(G)
    assert jitter > 0.5
    assert torch.allclose(L @ L.T, G + jitter * torch.eye(3))
    L, jitter = robust_cholesky(torch.zeros(3, 3))
    assert torch.isfinite(L).all() and jitter > 0
    L, jitter = robust_cholesky(torch.eye(3) * 2)
    assert jitter == 0.0 and torch.allclose(L, torch.eye(3) * math.sqrt(2))


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


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(SvdkitError, match="known methods: asvd, fwsvd, nsvd, nsvd2, soco, svd, svd-llm, svd-llm-v2"):
        get_method("nope")
    with pytest.raises(SvdkitError, match="has no option bogus"):
        make_config(get_method("svd-llm"), {"bogus": 1})


def test_statistics_with_nan_are_refused_naming_the_module():
    with pytest.raises(SvdkitError, match="model.layers.3.mlp.up_proj"):
        LinearStats({"gram": torch.tensor([[float("nan")]])}, 1, module="model.layers.3.mlp.up_proj")


@pytest.mark.parametrize("n", [5, 200, 577, 1536])
def test_block_triangular_gram_equals_the_full_product(n):
    from svdkit.calibration.statistics import gram_matrix

    x = torch.randn(300, n, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(gram_matrix(x), x.T @ x, rtol=1e-12, atol=1e-9)
