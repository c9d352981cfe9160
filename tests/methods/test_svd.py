"""Plain truncated SVD on a small matrix: the Eckart-Young optimum, singular values split evenly."""

from __future__ import annotations

import pytest
import torch
from conftest import decompose

pytestmark = pytest.mark.usefixtures("float64_default")


def test_plain_svd_is_eckart_young():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 9, generator=g)
    S = torch.linalg.svdvals(W)
    A, B = decompose("svd", W, None, 4)
    assert A.shape == (4, 9) and B.shape == (12, 4)
    assert torch.linalg.norm(W - B @ A) == pytest.approx(float(S[4:].square().sum().sqrt()), rel=1e-10)
    # sqrt(S) is split evenly: both factors carry the same singular values
    assert torch.allclose(torch.linalg.svdvals(A), S[:4].sqrt())
    assert torch.allclose(torch.linalg.svdvals(B), S[:4].sqrt())
    A, B = decompose("svd", W, None, 9)
    assert torch.allclose(B @ A, W)
