"""The contract every method meets on tiny models: real low-rank layers, exact parameter counts,
finite outputs; a model already compressed, or with an unused projection, is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import compressed, random_tokens
from torch import nn

import svdkit
from svdkit import LowRankLinear, rank_for_ratio
from svdkit.core.modeling_svdkit import QuantLowRankLinear
from svdkit.core.ranks import align_ranks

METHODS = svdkit.method_names()
KINDS = ["llama", "llama-bias", "qwen2", "mistral", "gemma", "gemma3", "qwen3-sliding"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_method_contract(kind, method):
    model, result, dense = compressed(kind, method)
    shapes = {}
    for name, mod in model.named_modules():
        if ".layers." in name and isinstance(mod, LowRankLinear):
            shapes[name] = (mod.out_features, mod.in_features, mod.rank)
        assert not (".layers." in name and type(mod) is nn.Linear), f"{name} was not compressed"
    assert len(shapes) == 14 and result.ranks == {n: k for n, (_, _, k) in shapes.items()}
    chosen = svdkit.get_method(method).ranks
    if chosen is not None:  # its own ranks over a quantized base: no ratio, no budget
        config = svdkit.get_method(method).config_cls()
        assert result.ranks == chosen({n: (m, k_in) for n, (m, k_in, _) in shapes.items()}, config)
        assert model.config.svdkit["ratio"] is None and "quantized" in model.config.svdkit
        assert all(isinstance(model.get_submodule(n), QuantLowRankLinear) for n in shapes)
        return
    uniform = sum(rank_for_ratio(m, n, 0.4) * (m + n) for m, n, _ in shapes.values())
    kept = sum(k * (m + n) for m, n, k in shapes.values())
    assert all(k % 8 == 0 for _, _, k in shapes.values())  # the default rank_multiple
    if svdkit.get_method(method).training is None:
        exact = svdkit.allocate_uniform({n: (m, k_in) for n, (m, k_in, _) in shapes.items()}, 0.4)
        assert result.ranks == align_ranks(exact, {n: (m, k_in) for n, (m, k_in, _) in shapes.items()}, 8)
        assert uniform - 8 * max(m + n for m, n, _ in shapes.values()) < kept <= uniform
    else:  # a whole-model training (soco) spends the uniform allocation's budget its own way
        assert uniform - 8 * max(m + n for m, n, _ in shapes.values()) < kept <= uniform
        assert len({k for _, _, k in shapes.values()}) > 1
    saved = sum(m * n - k * (m + n) for m, n, k in shapes.values())
    assert result.params_dense == dense and result.params == dense - saved == svdkit.count_parameters(model)
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    assert type(model.get_output_embeddings()) is nn.Linear
    with torch.no_grad():
        logits = model(input_ids=random_tokens(40, seed=2)[None]).logits
    assert torch.isfinite(logits).all()
    record = model.config.svdkit
    assert record["method"] == method and record["ratio"] == 0.4 and record["ranks"] == result.ranks
