"""The layer-by-layer calibration engine and the structural discovery of decoder layers and targets."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens, tiny_model
from torch import nn

from svdkit import SvdkitError, find_architecture
from svdkit.calibration.collect import collect_statistics, iterate_layers

LLAMA_TARGETS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


@pytest.mark.parametrize("kind", ["llama", "llama-bias", "qwen2", "mistral", "gemma", "gemma3", "qwen3-sliding"])
def test_finds_decoder_layers_and_projections(kind):
    model = tiny_model(kind)
    arch = find_architecture(model)
    assert arch.layers_path == "model.layers" and len(arch.layers) == 2
    assert sorted(arch.targets) == sorted(LLAMA_TARGETS)
    shapes = arch.shapes()
    assert shapes["model.layers.0.self_attn.k_proj"] == (32, 64)  # GQA: 2 KV heads of 16
    assert shapes["model.layers.1.mlp.down_proj"] == (64, 160)
    assert not any("embed" in n or "lm_head" in n for n in shapes)


def test_target_filter_and_unsupported_architectures():
    arch = find_architecture(tiny_model(), targets=["q_proj", "down_proj"])
    assert arch.targets == ["self_attn.q_proj", "mlp.down_proj"]
    with pytest.raises(SvdkitError, match="no linear layer"):
        find_architecture(tiny_model(), targets=["nonexistent"])
    conv = nn.Sequential(nn.Conv1d(3, 3, 1), nn.ReLU())
    with pytest.raises(SvdkitError, match="unsupported architecture Sequential: expected decoder blocks"):
        find_architecture(conv)


def reference_grams(model, windows):
    """X^T X and mean |x| of every target's input, from hooks on a plain full forward."""
    grams, absum, count = {}, {}, {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".layers." in name:

            def hook(m, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                grams[name] = grams.get(name, 0) + x.T @ x
                absum[name] = absum.get(name, 0) + x.abs().sum(0)
                count[name] = count.get(name, 0) + x.shape[0]

            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in windows:
            model(input_ids=ids[None])
    for h in handles:
        h.remove()
    return grams, {k: absum[k] / count[k] for k in absum}


@pytest.mark.parametrize("kind", ["llama", "llama-bias", "qwen2", "mistral", "gemma", "gemma3", "qwen3-sliding"])
def test_layerwise_statistics_equal_a_full_forward(kind):
    model = tiny_model(kind)
    windows = random_tokens(4 * 48).reshape(4, 48)
    grams, mean_abs = reference_grams(model, windows)
    stats = collect_statistics(
        model, find_architecture(model), windows, {"gram", "mean_abs"}, torch.device("cpu"), progress=False
    )
    assert set(stats) == set(grams)
    for name, st in stats.items():
        assert st.tokens == 4 * 48
        assert torch.allclose(st["gram"], grams[name], rtol=1e-4, atol=1e-4), name
        assert torch.allclose(st.mean_abs, mean_abs[name], rtol=1e-5), name
    # q, k and v read the same tensor: one accumulator serves all three
    assert stats["model.layers.1.self_attn.q_proj"].values is stats["model.layers.1.self_attn.v_proj"].values
    assert stats["model.layers.1.mlp.gate_proj"].values is stats["model.layers.1.mlp.up_proj"].values
    assert stats["model.layers.1.mlp.up_proj"].values is not stats["model.layers.1.mlp.down_proj"].values


def test_sequential_mode_feeds_the_modified_layer_forward():
    """Sequential mode yields each layer once per distinct input, each computed through the modules
    modified so far (within the layer too); the default mode yields every layer once, from dense inputs."""
    windows = random_tokens(2 * 32).reshape(2, 32)
    q, o, gate, up, down = "self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
    grams, stages = {}, {False: [], True: []}
    for sequential in (False, True):
        model = tiny_model()
        arch = find_architecture(model)
        for item in iterate_layers(model, arch, windows, {"gram"}, torch.device("cpu"), sequential, progress=False):
            stages[sequential].append(sorted(item.stats))
            for name, st in item.stats.items():
                grams[sequential, item.index, name] = st["gram"]
            with torch.no_grad():  # perturb what was just collected: only sequential mode may see it later
                for name in item.stats:
                    item.layer.get_submodule(name).weight.mul_(0.1)
    n_layers = len(find_architecture(tiny_model()).layers)
    assert stages[False] == [sorted(find_architecture(tiny_model()).targets)] * n_layers
    assert stages[True][:4] == [["self_attn.k_proj", q, "self_attn.v_proj"], [o], [gate, up], [down]]
    assert len(stages[True]) == 4 * n_layers
    assert torch.equal(grams[False, 0, q], grams[True, 0, q])
    # within layer 0, o_proj reads attention computed with the perturbed v_proj only in sequential mode
    assert not torch.allclose(grams[False, 0, o], grams[True, 0, o])
    assert not torch.allclose(grams[False, 0, down], grams[True, 0, down])
    assert not torch.allclose(grams[False, 1, q], grams[True, 1, q])


def test_engine_leaves_the_model_unchanged_and_hooks_removed():
    model = tiny_model()
    ids = random_tokens(32)[None]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    collect_statistics(model, find_architecture(model), ids, {"gram"}, torch.device("cpu"), progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("needs", [{"gram"}, {"gram", "cross"}])
def test_sequential_stages_leave_no_hooks_and_an_unchanged_model(needs):
    """The staged pass stops forwards midway (an exception in a hook): nothing may stay hooked."""
    model = tiny_model()
    ids = random_tokens(32)[None]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    items = list(iterate_layers(model, find_architecture(model), ids, needs, torch.device("cpu"), True, progress=False))
    assert len(items) == 4 * len(find_architecture(model).layers)
    assert all(not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
