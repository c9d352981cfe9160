"""SVD-LLM V2's loss-optimized truncation: exact math on small matrices."""

from __future__ import annotations

import pytest
import torch
from conftest import W, correlated_inputs, gram_stats, product

from svdkit import SvdkitError
from svdkit.calibration.statistics import LinearStats
from svdkit.methods import get_method, make_config
from svdkit.methods.linalg import eigen_whitening, robust_cholesky, whitened_singular_values

pytestmark = pytest.mark.usefixtures("float64_default")


@pytest.mark.parametrize("k", [1, 4, 8])
def test_v2_equals_svd_llm_on_a_full_rank_gram(k):
    X = correlated_inputs(9, 40)
    assert torch.allclose(
        product("svd-llm-v2", W, gram_stats(X), k), product("svd-llm", W, gram_stats(X), k), atol=1e-9
    )


def test_v2_loss_is_the_dropped_whitened_singular_values():
    X = correlated_inputs(9, 40)
    sv = whitened_singular_values(W, X @ X.T)
    L, _ = robust_cholesky(X @ X.T)
    assert torch.allclose(sv, torch.linalg.svdvals(W @ L), rtol=1e-9)  # any square root of G
    for k in (2, 5):
        err = ((W - product("svd-llm-v2", W, gram_stats(X), k)) @ X).norm()
        assert float(err) == pytest.approx(float(sv[k:].norm()), rel=1e-8)


def test_v2_on_a_rank_deficient_gram_needs_no_jitter_and_is_optimal():
    X = correlated_inputs(9, 5)  # 5 tokens, 9 channels: G has rank 5
    G = X @ X.T
    assert robust_cholesky(G)[1] > 0  # Cholesky would need jitter here
    S, _ = eigen_whitening(G)
    assert S.shape == (9, 5)
    sv = torch.linalg.svdvals(W @ S)
    W3 = product("svd-llm-v2", W, gram_stats(X), 3)
    assert float(((W - W3) @ X).norm()) == pytest.approx(float(sv[3:].norm()), rel=1e-6)
    # jittered Cholesky (SVD-LLM) is no better on the calibration inputs
    W3_v1 = product("svd-llm", W, gram_stats(X), 3)
    assert float(((W - W3) @ X).norm()) <= float(((W - W3_v1) @ X).norm()) + 1e-9


def test_v2_spare_ranks_keep_w_outside_the_reached_directions():
    """Ranks beyond the 5 reached directions hold the residual's SVD: at full rank W' = W exactly,
    and in between W' is exact on the calibration inputs and closer to W elsewhere."""
    X = correlated_inputs(9, 5)
    assert torch.allclose(product("svd-llm-v2", W, gram_stats(X), 9), W, atol=1e-8)
    W5, W7 = (product("svd-llm-v2", W, gram_stats(X), k) for k in (5, 7))
    assert torch.allclose(W5 @ X, W @ X, atol=1e-8) and torch.allclose(W7 @ X, W @ X, atol=1e-8)
    assert (W7 - W).norm() < (W5 - W).norm()


def test_v2_zero_gram_is_a_clear_error():
    with pytest.raises(ValueError, match="zero"):
        product("svd-llm-v2", W, LinearStats({"gram": torch.zeros(9, 9)}, tokens=4), 3)


@pytest.mark.parametrize("floor", [-1e-3, 1.0, float("nan"), "tiny"])
def test_v2_bad_floor_is_a_clear_error(floor):
    with pytest.raises(SvdkitError, match=r"rel_floor must be a number in \[0, 1\)"):
        make_config(get_method("svd-llm-v2"), {"rel_floor": floor})
