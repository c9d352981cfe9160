"""SVD-LLM: the whitening identity on small matrices, and on a tiny model a closer fit than plain SVD."""

from __future__ import annotations

import pytest
import torch
from conftest import compressed, correlated_inputs, decompose, random_tokens, tiny_model


@pytest.mark.usefixtures("float64_default")
def test_svd_llm_whitening_identity():
    """||(W - B A) X||_F equals the norm of the dropped singular values of W L, with X X^T = L L^T."""
    n, m, T, k = 10, 14, 200, 4
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(2))
    X = correlated_inputs(n, T)
    A, B = decompose("svd-llm", W, X, k)
    L = torch.linalg.cholesky(X @ X.T)
    dropped = torch.linalg.svdvals(W @ L)[k:]
    assert torch.linalg.norm((W - B @ A) @ X) == pytest.approx(float(dropped.square().sum().sqrt()), rel=1e-8)


@pytest.mark.usefixtures("float64_default")
def test_svd_llm_beats_plain_svd_on_the_calibration_outputs():
    n, m, T = 16, 20, 300
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(3))
    X = correlated_inputs(n, T, seed=3)
    for k in (2, 5, 10):
        A1, B1 = decompose("svd-llm", W, X, k)
        A0, B0 = decompose("svd", W, None, k)
        assert torch.linalg.norm((W - B1 @ A1) @ X) < torch.linalg.norm((W - B0 @ A0) @ X)


@pytest.mark.usefixtures("float64_default")
def test_svd_llm_survives_a_singular_gram_matrix():
    """Fewer tokens than channels: X X^T is singular, Cholesky needs jitter, the result stays near-optimal."""
    n, m, T, k = 12, 8, 5, 3
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(4))
    X = correlated_inputs(n, T, seed=4)
    A, B = decompose("svd-llm", W, X, k)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    # the best rank-k output error on X: drop singular values of W X beyond k
    best = float(torch.linalg.svdvals(W @ X)[k:].square().sum().sqrt())
    assert float(torch.linalg.norm((W - B @ A) @ X)) == pytest.approx(best, rel=1e-3, abs=1e-6)


def test_svd_llm_tracks_the_dense_model_better_than_plain_svd():
    ids = random_tokens(4 * 64, seed=1).reshape(4, 64)
    with torch.no_grad():
        ref = tiny_model()(input_ids=ids).logits
    err = {}
    for method in ("svd", "svd-llm"):
        model, _, _ = compressed("llama", method, ratio=0.3)
        with torch.no_grad():
            err[method] = float((model(input_ids=ids).logits - ref).square().mean())
    assert err["svd-llm"] < err["svd"]


@pytest.mark.usefixtures("float64_default")
def test_robust_cholesky_leaves_the_gram_matrix_exactly_as_it_was():
    """The jitter shifts G's diagonal in place (no n x n copy); G comes back bit for bit, and L is the
    Cholesky factor of G + jitter I."""
    from svdkit.methods.linalg import robust_cholesky

    X = correlated_inputs(12, 5, seed=4)
    G = X @ X.T / 5  # rank 5 of 12: not positive definite
    before = G.clone()
    L, jitter = robust_cholesky(G)
    assert jitter > 0 and torch.equal(G, before)
    assert torch.equal(L, torch.linalg.cholesky(G + jitter * torch.eye(12)))
