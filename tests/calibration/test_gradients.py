"""The layer-wise gradient pass: Fisher information equal to a whole-model backward, loss from any layer."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens, tiny_model

import svdkit
from svdkit.calibration.collect import collect_statistics
from svdkit.calibration.gradients import collect_fisher, loss_from_layer
from svdkit.engine import capture_layer_inputs, layer_output

CPU = torch.device("cpu")


@pytest.mark.parametrize("kind", ["llama", "gemma3", "qwen3-sliding"])
def test_fisher_equals_a_whole_model_backward(kind):
    model = tiny_model(kind).eval()
    arch = svdkit.find_architecture(model)
    windows = random_tokens(3 * 32, seed=5).view(3, 32)
    model.lm_head.weight.requires_grad_(True)
    model.model.norm.weight.requires_grad_(False)
    q = model.model.layers[0].self_attn.q_proj.weight
    q.grad = torch.ones_like(q)  # a user's gradient survives the pass
    fisher = collect_fisher(model, arch, windows, CPU, progress=False)
    assert set(fisher) == set(arch.shapes())
    assert model.lm_head.weight.requires_grad and not model.model.norm.weight.requires_grad  # flags restored
    assert torch.equal(q.grad, torch.ones_like(q))
    assert model.model.layers[1].mlp.down_proj.weight.grad is None
    model.requires_grad_(True)
    expected = {}
    for ids in windows:
        model.zero_grad()
        model(input_ids=ids[None], labels=ids[None]).loss.backward()
        for name in fisher:
            rows = model.get_submodule(name).weight.grad.double().pow(2).sum(1) / len(windows)
            expected[name] = expected.get(name, 0) + rows
    for name, value in fisher.items():
        assert value.shape == (arch.shapes()[name][0],)
        assert torch.allclose(value, expected[name], rtol=1e-5, atol=1e-12 * float(expected[name].max())), name


def test_loss_from_any_layer_equals_the_full_forward():
    model = tiny_model("gemma3").eval()
    arch = svdkit.find_architecture(model)
    ids = random_tokens(2 * 24, seed=6).view(2, 24)
    with torch.no_grad():
        full = float(model(input_ids=ids, labels=ids).loss)
        hidden, kwargs = capture_layer_inputs(model, arch, ids[None], CPU, progress=False)
        x = hidden[0]
        for start, layer in enumerate(arch.layers):
            assert float(loss_from_layer(model, arch, ids, start, x)) == pytest.approx(full, rel=1e-6)
            x = layer_output(layer, x, kwargs[start], CPU)
        assert float(loss_from_layer(model, arch, ids, len(arch.layers), x)) == pytest.approx(full, rel=1e-6)


def test_collect_statistics_merges_inputs_and_fisher():
    model = tiny_model("llama").eval()
    arch = svdkit.find_architecture(model)
    windows = random_tokens(2 * 16, seed=7).view(2, 16)
    stats = collect_statistics(model, arch, windows, {"gram", "fisher"}, CPU, progress=False)
    q, k = stats["model.layers.0.self_attn.q_proj"], stats["model.layers.0.self_attn.k_proj"]
    assert torch.equal(q["gram"], k["gram"]) and q["fisher"].shape != k["fisher"].shape
    with pytest.raises(svdkit.SvdkitError, match="unknown statistic"):
        collect_statistics(model, arch, windows, {"hessian"}, CPU, progress=False)
