"""The method registry: lookup and options, the nested flag allocators rely on, a failing method named."""

from __future__ import annotations

import pytest
import torch
from conftest import W, correlated_inputs, stats_of, tiny_model

import svdkit
from svdkit import SvdkitError
from svdkit.methods import get_method, make_config, method_names


@pytest.mark.usefixtures("float64_default")
def test_unknown_method_lists_the_known_ones():
    known = "known methods: asvd, fwsvd, nsvd, nsvd2, qlr, soco, svd, svd-llm, svd-llm-v2"
    with pytest.raises(SvdkitError, match=known):
        get_method("nope")
    with pytest.raises(SvdkitError, match="has no option bogus"):
        make_config(get_method("svd-llm"), {"bogus": 1})


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("method", [m for m in method_names() if get_method(m).nested])
def test_nested_methods_slice_to_lower_ranks(method):
    """The flag allocators rely on: rank-k factors are the first k of a higher-rank result."""
    X = correlated_inputs(9, 40)
    importance = torch.rand(12, generator=torch.Generator().manual_seed(3)) + 0.5
    stats = stats_of(X, fisher=importance)
    m = get_method(method)
    cfg = make_config(m)
    A, B = m.decompose(W, stats, 7, cfg)
    a, b = m.decompose(W, stats, 3, cfg)
    assert torch.allclose(B[:, :3] @ A[:3], b @ a, atol=1e-10)


def test_a_failing_method_names_the_module():
    """A zero Gram matrix (no input ever reached the layer) is a clear error, not a traceback."""
    from svdkit.calibration.statistics import LinearStats

    model = tiny_model("llama")
    shapes = svdkit.find_architecture(model).shapes()
    zeros = {
        n: LinearStats({"gram": torch.zeros(n_in, n_in, dtype=torch.float64)}, 10, n) for n, (_, n_in) in shapes.items()
    }
    with pytest.raises(SvdkitError, match=r"method nsvd2 failed on model\.layers\.0\.self_attn\.q_proj: .*zero"):
        svdkit.compress(model, method="nsvd2", statistics=zeros, device="cpu", progress=False)
    with pytest.raises(SvdkitError, match="sequential mode"):
        svdkit.compress(tiny_model("llama"), method="svd-llm", statistics=zeros, sequential=True, progress=False)
