"""SVD-LLM V2's heterogeneous allocation: the ratio rules, the groups, and the allocator inside
compress() (also with sequential calibration)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compress_small, random_tokens, tiny_model

import svdkit
from svdkit import SvdkitError
from svdkit.allocators.v2 import group_of, heterogeneous_ratios
from svdkit.calibration.collect import collect_statistics
from svdkit.sources.text import calibration_windows

pytestmark = pytest.mark.usefixtures("float64_default")


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
@pytest.mark.parametrize("losses", [[0.3, 0.5, 0.9, 0.2], [1e-3, 5.0, 80.0, 3e4, 2.0], [0.0, 1.0, 2.0]])
def test_v2_ratios_keep_the_group_mean_and_give_lossier_matrices_more(losses, ratio):
    r = heterogeneous_ratios(losses, ratio)
    assert sum(r) / len(r) == pytest.approx(ratio, abs=1e-9)
    assert all(0.0 <= x <= 0.9 for x in r)
    order = sorted(range(len(losses)), key=lambda i: losses[i])
    assert all(r[a] >= r[b] - 1e-12 for a, b in zip(order, order[1:], strict=False))  # monotone
    assert r[order[0]] > ratio > r[order[-1]]  # the spread is real


@pytest.mark.parametrize("strength", [0.1, 0.5, 2.0])
def test_power_rule_ratios_keep_the_mean_and_order(strength):
    losses = [1e-3, 5.0, 80.0, 3e4, 2.0]
    r = heterogeneous_ratios(losses, 0.4, strength=strength, rule="power")
    assert sum(r) / len(r) == pytest.approx(0.4, abs=1e-9) and all(0 <= x <= 0.9 for x in r)
    order = sorted(range(len(losses)), key=lambda i: losses[i])
    assert all(r[a] >= r[b] - 1e-12 for a, b in zip(order, order[1:], strict=False))
    assert heterogeneous_ratios(losses, 0.4, strength=0.0, rule="power") == pytest.approx([0.4] * 5)
    # without clipping the ratios are exactly ratio * (L / geometric mean)^-strength / mean
    mild = [1.0, 2.0, 4.0]
    got = heterogeneous_ratios(mild, 0.3, strength=0.2, rule="power")
    w = [x**-0.2 for x in mild]
    assert got == pytest.approx([0.3 * x * 3 / sum(w) for x in w], abs=1e-9)


def test_v2_ratios_work_where_the_papers_formula_breaks():
    """All losses below 1 (log < 0) or equal to 1 (log = 0): the paper's 1 / log L is negative or infinite."""
    for losses in ([0.5, 0.25, 0.125], [1.0, 1.0, 2.0]):
        r = heterogeneous_ratios(losses, 0.4)
        assert all(math.isfinite(x) and 0 <= x <= 0.9 for x in r) and sum(r) / 3 == pytest.approx(0.4)
    # scale-free: the unit of the loss does not matter
    assert heterogeneous_ratios([0.5, 0.25, 0.125], 0.4) == pytest.approx(heterogeneous_ratios([50, 25, 12.5], 0.4))


def test_v2_ratio_strength_and_clipping():
    losses = [1.0, 10.0, 100.0, 1000.0]
    assert heterogeneous_ratios(losses, 0.3, strength=0.0) == pytest.approx([0.3] * 4)
    mild, strong = heterogeneous_ratios(losses, 0.3, 0.5), heterogeneous_ratios(losses, 0.3, 3.0)
    assert max(mild) - min(mild) < max(strong) - min(strong)
    clipped = heterogeneous_ratios(losses, 0.3, strength=3.0, lo=0.2, hi=0.45)
    assert min(clipped) >= 0.2 - 1e-12 and max(clipped) <= 0.45 + 1e-12
    assert sum(clipped) / 4 == pytest.approx(0.3, abs=1e-9)
    assert heterogeneous_ratios([3.0, 3.0], 0.5) == pytest.approx([0.5, 0.5])


def test_group_of_strips_the_layer_index():
    assert group_of("model.layers.3.self_attn.q_proj", (64, 64)) == group_of(
        "model.layers.12.self_attn.q_proj", (64, 64)
    )
    assert group_of("model.layers.3.self_attn.q_proj", (64, 64)) != group_of(
        "model.layers.3.self_attn.k_proj", (64, 64)
    )


@pytest.mark.parametrize("method", ["svd-llm-v2", "svd"])
def test_compress_with_v2_allocation(method, tmp_path, tiny_tokenizer):
    model = tiny_model("llama")
    shapes = svdkit.find_architecture(model).shapes()
    uniform = compress_small(tiny_model("llama"), method=method, ratio=0.4)
    r = compress_small(model, method=method, ratio=0.4, allocation="v2", statistics_dir=tmp_path / "stats")
    assert r.ranks != uniform.ranks  # heterogeneous
    # every type keeps uniform's budget up to rank flooring: the whole model within a few ranks of it
    budget = sum((1 - 0.4) * m * n for m, n in shapes.values())
    used = sum(k * sum(shapes[n]) for n, k in r.ranks.items()) + sum(math.prod(shapes[n]) for n in r.dense_kept)
    assert used <= budget + 1e-6 and used >= budget - sum(sum(s) for s in shapes.values())
    assert model.config.svdkit["allocation"]["name"] == "v2"
    assert "ratio_range" in r.allocation
    assert not (tmp_path / "stats").exists()  # nothing spilled: only each matrix's spectrum was kept
    svdkit.save(model, tiny_tokenizer, tmp_path / "out")
    loaded, _ = svdkit.load(tmp_path / "out")
    ids = random_tokens(20, seed=9)[None]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_v2_allocation_gives_the_lossier_layer_more_rank():
    """Scale one layer's q_proj up tenfold: its truncation loss grows, so it gets the largest q rank."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.mul_(10)
    r = compress_small(model, method="svd-llm-v2", ratio=0.4, allocation="v2")
    ranks = [r.ranks.get(f"model.layers.{i}.self_attn.q_proj", 10**6) for i in range(2)]
    assert ranks[1] > ranks[0]


def test_v2_allocation_bad_options():
    with pytest.raises(SvdkitError, match=r"strength must be a number in \[-10, 10\]"):
        compress_small(tiny_model("llama"), method="svd-llm-v2", allocation="v2", allocation_options={"strength": 11})
    for key, value, fragment in (("rule", "cubic", "rule must be 'log' or 'power'"), ("loss", "l1", "loss must be")):
        with pytest.raises(SvdkitError, match=fragment):
            compress_small(tiny_model("llama"), method="svd-llm-v2", allocation="v2", allocation_options={key: value})
    with pytest.raises(SvdkitError, match="min_ratio 0.5 is above max_ratio 0.4"):
        compress_small(
            tiny_model("llama"),
            method="svd-llm-v2",
            allocation="v2",
            allocation_options={"min_ratio": 0.5, "max_ratio": 0.4},
        )


def test_sequential_with_v2_allocation_takes_ranks_from_the_dense_model(tmp_path):
    """A dense pass fixes the ranks (the same as without sequential), then a sequential pass factors."""
    plain = compress_small(tiny_model("llama"), method="svd-llm-v2", ratio=0.4, allocation="v2")
    model = tiny_model("llama")
    seq = compress_small(
        model, method="svd-llm-v2", ratio=0.4, allocation="v2", sequential=True, update="lstsq", statistics_dir=tmp_path
    )
    assert seq.ranks == plain.ranks and list(tmp_path.iterdir()) == []
    assert model.config.svdkit["calibration"]["sequential"] is True


def test_v2_from_its_summary_pass_equals_v2_from_every_matrix_statistics():
    """The summary pass keeps only spectra and recalibrates to factor; with every matrix's statistics
    given at once (what the allocation used to hold) the ranks and weights are bit-identical."""
    model, reference = tiny_model("llama"), tiny_model("llama")
    r = compress_small(model, method="svd-llm", ratio=0.4, allocation="v2")
    arch = svdkit.find_architecture(reference)
    windows = calibration_windows(random_tokens(4 * 32, seed=1), 4, 32, 0, 0)  # compress_small's
    stats = collect_statistics(reference, arch, windows, {"gram"}, torch.device("cpu"), progress=False)
    expected = compress_small(reference, method="svd-llm", ratio=0.4, allocation="v2", statistics=stats)
    assert r.ranks == expected.ranks and r.ranks != compress_small(tiny_model("llama"), ratio=0.4).ranks
    state = reference.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
