"""The methods' linear algebra: robust Cholesky, eigen whitening, the SVD from a Gram matrix, the NSVD rank split."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import correlated_inputs

from svdkit.methods.linalg import eigen_whitening, gram_svd, robust_cholesky, split_rank

pytestmark = pytest.mark.usefixtures("float64_default")


def test_robust_cholesky_on_indefinite_and_zero_matrices():
    G = torch.diag(torch.tensor([4.0, 1.0, -0.5]))
    L, jitter = robust_cholesky(G)
    assert jitter > 0.5
    assert torch.allclose(L @ L.T, G + jitter * torch.eye(3))
    L, jitter = robust_cholesky(torch.zeros(3, 3))
    assert torch.isfinite(L).all() and jitter > 0
    L, jitter = robust_cholesky(torch.eye(3) * 2)
    assert jitter == 0.0 and torch.allclose(L, torch.eye(3) * math.sqrt(2))


def test_split_rank_default_split():
    assert split_rank(100, 0.95) == (95, 5)
    assert split_rank(1, 0.95) == (1, 0)
    assert split_rank(10, 0.01) == (1, 9)


def test_eigen_whitening_of_a_full_rank_gram():
    X = correlated_inputs(9, 40)
    S, S_pinv = eigen_whitening(X @ X.T)
    assert torch.allclose(S @ S.T, X @ X.T, atol=1e-8)
    assert torch.allclose(S_pinv @ S, torch.eye(9), atol=1e-8)


@pytest.mark.parametrize("shape", [(30, 80), (80, 30), (40, 40)])
def test_gram_svd_matches_the_svd(shape):
    """Wide, tall and square: the singular values and the top factors' product equal torch's SVD's; a
    rank-deficient matrix gets zero vectors, not noise, for its null directions."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(*shape, dtype=torch.float64, generator=g) * torch.logspace(0, -4, shape[1], dtype=torch.float64)
    U, S, Vh = gram_svd(M)
    want = torch.linalg.svdvals(M)
    assert torch.allclose(S, want, rtol=1e-9, atol=1e-8 * float(want[0]))  # squared: sqrt(eps) S_1 at worst
    k = min(shape) // 2
    low = (U[:, :k] * S[:k]) @ Vh[:k]
    U2, S2, Vh2 = torch.linalg.svd(M, full_matrices=False)
    assert torch.allclose(low, (U2[:, :k] * S2[:k]) @ Vh2[:k], atol=1e-10 * float(S2[0]))
    assert torch.allclose((U * S) @ Vh, M, atol=1e-9 * float(S2[0]))
    deficient = torch.cat([M[:, :5], torch.zeros(shape[0], shape[1] - 5, dtype=torch.float64)], 1)
    U, S, Vh = gram_svd(deficient)
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
    assert torch.allclose((U * S) @ Vh, deficient, atol=1e-9 * float(S[0]))
