"""The least-squares update of B after truncation (svdkit.pipeline.update): the optimum on small
matrices, and through compress() a closer fit to the dense model."""

from __future__ import annotations

import pytest
import torch
from conftest import W, compress_small, correlated_inputs, decompose, random_tokens, tiny_model

import svdkit
from svdkit import SvdkitError
from svdkit.pipeline.update import lstsq_update

pytestmark = pytest.mark.usefixtures("float64_default")


def test_lstsq_update_is_the_least_squares_optimum_for_fixed_a():
    X = correlated_inputs(9, 40)
    G = X @ X.T / 40
    A, B = decompose("svd", W, X, 4)
    B1 = lstsq_update(W, A, B, G)
    expected = torch.linalg.lstsq((A @ X).T, (W @ X).T).solution.T  # argmin_B ||W X - B A X||
    assert torch.allclose(B1, expected, atol=1e-9)
    assert ((W - B1 @ A) @ X).norm() < ((W - B @ A) @ X).norm()


def test_lstsq_update_changes_nothing_after_svd_llm():
    X = correlated_inputs(9, 40)
    A, B = decompose("svd-llm", W, X, 4)
    assert torch.allclose(lstsq_update(W, A, B, X @ X.T / 40), B, atol=1e-9)


def test_lstsq_update_with_other_inputs_fits_the_dense_outputs():
    """Sequential calibration: the compressed layer sees X2, the dense one X. B fits W X from A X2."""
    X = correlated_inputs(9, 40)
    X2 = X + 0.3 * correlated_inputs(9, 40, seed=3)
    A, B = decompose("svd-llm", W, X2, 4)
    B1 = lstsq_update(W, A, B, X2 @ X2.T / 40, X @ X2.T / 40)
    expected = torch.linalg.lstsq((A @ X2).T, (W @ X).T).solution.T
    assert torch.allclose(B1, expected, atol=1e-8)


def test_lstsq_update_keeps_b_where_the_inputs_never_reach():
    """V2's spare ranks hold W on unreached directions; the refit must not zero them."""
    X = correlated_inputs(9, 5)
    A, B = decompose("svd-llm-v2", W, X, 7)
    B1 = lstsq_update(W, A, B, X @ X.T / 5)
    assert torch.allclose(B1 @ A @ X, W @ X, atol=1e-8)
    assert (W - B1 @ A).norm() <= (W - B @ A).norm() + 1e-8
    assert B1.abs().sum(0).min() > 0  # no column was wiped


@pytest.mark.parametrize("method", ["svd", "asvd"])
def test_compress_with_update_lowers_the_output_error(method):
    X_ids = random_tokens(40, seed=5)[None]
    dense = tiny_model("llama")
    with torch.no_grad():
        ref = dense(input_ids=X_ids).logits
    errs = {}
    for update in ("none", "lstsq"):
        model = tiny_model("llama")
        r = compress_small(model, method=method, ratio=0.4, update=update, rank_multiple=1)
        assert model.config.svdkit["update"] == update and r.params < svdkit.count_parameters(dense)
        with torch.no_grad():
            errs[update] = float((model(input_ids=X_ids).logits - ref).norm())
    assert errs["lstsq"] < errs["none"]


def test_unknown_update_is_a_clear_error():
    with pytest.raises(SvdkitError, match="unknown update 'ridge'; known: none, lstsq"):
        compress_small(tiny_model("llama"), update="ridge")


def test_sequential_update_fits_the_dense_model_better():
    """On the calibration windows (where the least-squares fit is guaranteed), the sequential update
    brings the compressed model's last hidden states closer to the dense model's."""
    from svdkit.sources.text import calibration_windows

    ids = calibration_windows(random_tokens(4 * 32, seed=1), 4, 32, 0, 0)
    with torch.no_grad():
        ref = tiny_model("llama")(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    errs = {}
    for update in ("none", "lstsq"):
        model = tiny_model("llama")
        compress_small(model, method="svd-llm", ratio=0.5, sequential=True, update=update)
        with torch.no_grad():
            errs[update] = float((model(input_ids=ids, output_hidden_states=True).hidden_states[-1] - ref).norm())
    assert errs["lstsq"] < 0.8 * errs["none"]
