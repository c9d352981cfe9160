"""The methods' linear algebra: robust Cholesky, eigen whitening, the NSVD rank split."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import correlated_inputs

from svdkit.methods.linalg import eigen_whitening, robust_cholesky, split_rank

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
