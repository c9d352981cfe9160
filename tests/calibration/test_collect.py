"""The layer-by-layer calibration engine: statistics equal to a full forward, sequential mode (also
through compress()), the two-stream cross statistic, precomputed statistics, no hooks left behind."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens, tiny_model
from torch import nn

import svdkit
from svdkit import find_architecture
from svdkit.calibration.collect import calibrate_layers, collect_statistics


def walked(model, arch, windows, needs, sequential=False, use=None):
    """Every item calibrate_layers hands over, in order (`use` also sees each, as it comes)."""
    items = []

    def keep(item):
        items.append(item)
        if use is not None:
            use(item)

    calibrate_layers(model, arch, windows, needs, torch.device("cpu"), keep, sequential, progress=False)
    return items


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
        assert torch.allclose(st["gram"], grams[name] / st.tokens, rtol=1e-4, atol=1e-6), name  # a mean
        assert torch.equal(st["gram"], st["gram"].T) and st.gram_mean is st["gram"]
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

        def perturb(item, sequential=sequential):
            stages[sequential].append(sorted(item.stats))
            for name, st in item.stats.items():
                grams[sequential, item.index, name] = st["gram"]
            with torch.no_grad():  # perturb what was just collected: only sequential mode may see it later
                for name in item.stats:
                    item.layer.get_submodule(name).weight.mul_(0.1)

        walked(model, arch, windows, {"gram"}, sequential, perturb)
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
    items = walked(model, find_architecture(model), ids, needs, sequential=True)
    assert len(items) == 4 * len(find_architecture(model).layers)
    assert all(not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.usefixtures("float64_default")
def test_two_stream_cross_statistic(tmp_path):
    """Without any replacement both streams are the dense one, so C = G exactly; once layer 0 is
    compressed, layer 1's C is the dense inputs against the compressed model's inputs."""
    from svdkit.sources.text import calibration_windows

    model = tiny_model("llama")
    arch = svdkit.find_architecture(model)
    windows = calibration_windows(random_tokens(4 * 32, seed=1), 4, 32)
    for item in walked(model, arch, windows, {"gram", "cross"}, sequential=True):
        for st in item.stats.values():
            assert torch.allclose(st["cross"], st["gram"], rtol=1e-6, atol=1e-6)
    seen = {}

    def compress_v(item):
        seen.update({(item.index, name): st for name, st in item.stats.items()})
        if item.index == 0 and "self_attn.v_proj" in item.stats:
            with torch.no_grad():
                item.layer.self_attn.v_proj.weight.mul_(0.5)  # "compress" layer 0's v_proj

    walked(model, arch, windows, {"gram", "cross"}, sequential=True, use=compress_v)
    # the dense stream runs through an unmodified copy: o_proj's inputs differ within layer 0 already
    for key in [(0, "self_attn.o_proj"), (1, "self_attn.q_proj")]:
        assert not torch.allclose(seen[key]["cross"], seen[key]["gram"], rtol=1e-3)
    assert torch.equal(seen[0, "self_attn.q_proj"]["cross"], seen[0, "self_attn.q_proj"]["gram"])
    with pytest.raises(svdkit.SvdkitError, match="needs sequential=True"):
        walked(tiny_model("llama"), arch, windows, {"cross"})
