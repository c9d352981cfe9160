"""ASVD's sensitivity-based rank search: the threshold search, the measured table, its cache, and the
allocator inside compress()."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from conftest import random_tokens, tiny_model

import svdkit
from svdkit import LowRankLinear, SvdkitError, rank_for_ratio
from svdkit.allocators import AllocationContext, get_allocator, make_allocation_config
from svdkit.allocators import sensitivity as sens
from svdkit.calibration.collect import collect_statistics
from svdkit.methods import get_method, make_config

CPU = torch.device("cpu")


def table(ppl: dict[str, list[float]], grid=(0.25, 0.5, 0.75)) -> sens.SensitivityTable:
    return sens.SensitivityTable({}, list(grid), 10.0, ppl)


def context(model, method="asvd", windows=None, ratio=0.4):
    arch = svdkit.find_architecture(model)
    spec = get_method(method)
    windows = random_tokens(4 * 32, seed=1).view(4, 32) if windows is None else windows
    stats = collect_statistics(model, arch, windows, spec.requires, CPU, progress=False) if spec.requires else None
    return AllocationContext(
        shapes=arch.shapes(),
        ratio=ratio,
        model=model,
        arch=arch,
        method=spec,
        method_config=make_config(spec),
        statistics=stats,
        windows=windows,
        device=CPU,
        progress=False,
    )


def test_choose_ranks_gives_rank_to_the_sensitive_matrix():
    shapes = {"robust": (40, 40), "sensitive": (40, 40)}
    t = table({"robust": [10.5, 10.2, 10.1], "sensitive": [50.0, 20.0, 11.0]})
    ranks, tau = sens.choose_ranks(t, shapes, 0.5)
    # budget: half of 3200; robust at 0.25 (rank 5, 400) + sensitive at 0.75 (rank 15, 1200) = 1600
    assert ranks == {"robust": rank_for_ratio(40, 40, 0.75), "sensitive": rank_for_ratio(40, 40, 0.25)}
    assert tau == 11.0
    cost = sum(k * 80 for k in ranks.values())
    assert cost <= 0.5 * 3200
    # a looser target (2560) is met at a lower threshold, with the sensitive matrix kept whole
    ranks, tau = sens.choose_ranks(t, shapes, 0.2)
    assert tau == 10.2 and ranks == {"robust": rank_for_ratio(40, 40, 0.5), "sensitive": None}


def test_choose_ranks_meets_the_budget_at_the_smallest_threshold():
    g = torch.Generator().manual_seed(0)
    shapes = {f"m{i}": (30 + i, 20 + 2 * i) for i in range(12)}
    grid = (0.1, 0.3, 0.5, 0.7, 0.9)
    ppl = {n: sorted((torch.rand(5, generator=g) * 30 + 10).tolist(), reverse=True) for n in shapes}
    t = table(ppl, grid)

    def cost_at(tau: float) -> int:
        total = 0
        for name, (m, n) in shapes.items():
            p = next((p for p, v in zip(grid, ppl[name], strict=True) if v <= tau), None)
            total += m * n if p is None else rank_for_ratio(m, n, 1 - p) * (m + n)
        return total

    budget_of = {r: (1 - r) * sum(m * n for m, n in shapes.values()) for r in (0.2, 0.4, 0.6)}
    for ratio, budget in budget_of.items():
        ranks, tau = sens.choose_ranks(t, shapes, ratio)
        cost = sum(m * n if ranks[k] is None else ranks[k] * (m + n) for k, (m, n) in shapes.items())
        assert cost == cost_at(tau) <= budget
        lower = [v for vs in ppl.values() for v in vs if v < tau]
        if lower:  # the next smaller threshold misses the budget
            assert cost_at(max(lower)) > budget


def test_choose_ranks_refuses_an_unreachable_ratio():
    t = table({"a": [11.0, 10.5, 10.1]})
    with pytest.raises(SvdkitError, match="cannot be met with the sensitivity grid"):
        sens.choose_ranks(t, {"a": (40, 40)}, 0.9)


@pytest.mark.parametrize(
    "options,fragment",
    [
        ({"windows": 0}, "windows must be a positive integer"),
        ({"seqlen": 1}, "seqlen must be an integer >= 2"),
        ({"grid": [0.5, 1.0]}, "grid must be kept fractions"),
        ({"grid": []}, "grid must be kept fractions"),
        ({"steps": 3}, "has no option steps"),
    ],
)
def test_bad_sensitivity_options(options, fragment):
    with pytest.raises(SvdkitError, match=fragment):
        make_allocation_config(get_allocator("sensitivity"), options)


def test_table_entries_are_the_perplexity_with_that_matrix_alone_compressed(tmp_path):
    model = tiny_model("llama").eval()
    ctx = context(model)
    cfg = sens.SensitivityConfig(windows=2, seqlen=16, grid=(0.3, 0.7), cache=str(tmp_path / "t.json"))
    t = sens.measure_sensitivity(ctx, cfg)
    assert set(t.ppl) == set(ctx.shapes) and all(len(v) == 2 for v in t.ppl.values())
    ids = ctx.windows[:2, :16]
    with torch.no_grad():
        dense = math.exp(float(model(input_ids=ids, labels=ids).loss))
        assert t.dense_ppl == pytest.approx(dense, rel=1e-5)
        name = "model.layers.1.mlp.down_proj"
        m, n = ctx.shapes[name]
        k = rank_for_ratio(m, n, 1 - 0.3)
        one = copy.deepcopy(model)
        W = one.get_submodule(name).weight.double()
        A, B = ctx.method.decompose(W, ctx.statistics[name], k, ctx.method_config)
        one.set_submodule(name, LowRankLinear.from_factors(A.float(), B.float(), None))
        expected = math.exp(float(one(input_ids=ids, labels=ids).loss))
    assert t.ppl[name][0] == pytest.approx(expected, rel=1e-4)
    assert t.ppl[name][0] != pytest.approx(t.dense_ppl, rel=1e-6)
    # the model itself is untouched
    assert not any(isinstance(mod, LowRankLinear) for mod in model.modules())


def test_cache_is_reused_for_another_ratio_and_ignored_for_another_model(tmp_path, monkeypatch):
    calls = []
    real = sens.loss_from_layer
    monkeypatch.setattr(sens, "loss_from_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = tmp_path / "table.json"
    cfg = make_allocation_config(
        get_allocator("sensitivity"), {"windows": 2, "seqlen": 16, "grid": [0.3, 0.7], "cache": str(cache)}
    )
    model = tiny_model("llama").eval()
    first = get_allocator("sensitivity").allocate(context(model, ratio=0.3), cfg)
    measured = len(calls)
    assert measured > 0 and cache.is_file()
    first_key = json.loads(cache.read_text())["key"]
    second = get_allocator("sensitivity").allocate(context(model, ratio=0.5), cfg)
    assert len(calls) == measured  # nothing measured again
    shapes = svdkit.find_architecture(model).shapes()

    def cost(ranks):
        return sum(m * n if ranks[k] is None else ranks[k] * (m + n) for k, (m, n) in shapes.items())

    assert cost(second) < cost(first) <= 0.7 * sum(m * n for m, n in shapes.values())

    other = tiny_model("llama", seed=7).eval()
    with pytest.warns(UserWarning, match="ignoring sensitivity cache .* other settings .*model_digest"):
        get_allocator("sensitivity").allocate(context(other, ratio=0.3), cfg)
    assert len(calls) > measured
    # the file now holds the other model's table under that model's key: measuring it again reads the file
    # without a warning or a single evaluation, so the key written is the one computed for the other model
    written = json.loads(cache.read_text())["key"]
    remeasured, ctx = len(calls), context(other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = sens.measure_sensitivity(ctx, cfg)
    assert len(calls) == remeasured and ctx.report["sensitivity_cache"] == str(cache)
    assert again.key == written and written["model_digest"] != first_key["model_digest"]
    cache.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable sensitivity cache"):
        get_allocator("sensitivity").allocate(context(other, ratio=0.3), cfg)


def test_an_interrupted_search_resumes(tmp_path, monkeypatch):
    cache = tmp_path / "table.json"
    cfg = sens.SensitivityConfig(windows=1, seqlen=16, grid=(0.5,), cache=str(cache))
    model = tiny_model("llama").eval()
    real = sens.loss_from_layer
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sens, "loss_from_layer", flaky)
    with pytest.raises(KeyboardInterrupt):
        sens.measure_sensitivity(context(model), cfg)
    saved = json.loads(cache.read_text())
    assert len(saved["ppl"]) == 7  # layer 0 finished and was saved
    assert not any(isinstance(mod, LowRankLinear) for mod in model.modules())
    calls.clear()
    monkeypatch.setattr(sens, "loss_from_layer", real)
    t = sens.measure_sensitivity(context(model), cfg)
    assert (
        len(t.ppl) == 14 and t.ppl["model.layers.0.self_attn.q_proj"] == saved["ppl"]["model.layers.0.self_attn.q_proj"]
    )


@pytest.mark.parametrize("method", ["asvd", "nsvd"])
def test_compress_with_sensitivity_allocation(method, tmp_path, tiny_tokenizer):
    model = tiny_model("llama")
    dense = svdkit.count_parameters(model)
    calib = random_tokens(4 * 32, seed=1)
    r = svdkit.compress(
        model,
        method=method,
        ratio=0.4,
        calib=calib,
        calib_samples=4,
        calib_seqlen=32,
        device="cpu",
        progress=False,
        allocation="sensitivity",
        allocation_options={"windows": 2, "seqlen": 16, "cache": str(tmp_path / "s.json")},
    )
    targets = sum(m * n for m, n in svdkit.find_architecture(tiny_model("llama")).shapes().values())
    assert dense - r.params >= 0.4 * targets - 1e-6  # the global target is met
    assert r.allocation["name"] == "sensitivity" and r.allocation["threshold_ppl"] > 0
    assert len(set(r.ranks.values())) > 1 or r.dense_kept  # not the uniform answer
    record = model.config.svdkit
    assert record["allocation"]["name"] == "sensitivity" and record["ranks"] == r.ranks
    svdkit.save(model, tiny_tokenizer, tmp_path / "out")
    loaded, _ = svdkit.load(tmp_path / "out")
    assert svdkit.count_parameters(loaded) == r.params
    ids = random_tokens(20, seed=9)[None]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_an_unreachable_ratio_fails_before_measuring(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sens, "loss_from_layer", lambda *a, **k: calls.append(1))
    model = tiny_model("llama").eval()
    cfg = sens.SensitivityConfig(windows=1, seqlen=16, grid=(0.5, 0.9), cache=str(tmp_path / "t.json"))
    with pytest.raises(SvdkitError, match="cannot be met with the sensitivity grid"):
        get_allocator("sensitivity").allocate(context(model, ratio=0.6), cfg)
    assert not calls and not (tmp_path / "t.json").exists()
    with pytest.raises(SvdkitError, match="cache must be a file path"):
        make_allocation_config(get_allocator("sensitivity"), {"cache": 123})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moves the model to a GPU between two searches")
def test_a_cache_measured_on_the_cpu_is_reused_on_a_gpu(tmp_path, monkeypatch):
    """The cache key's sums are taken on the CPU wherever the model lives (run by benchmarks/gpu_check.sh)."""
    calls = []
    real = sens.loss_from_layer
    monkeypatch.setattr(sens, "loss_from_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = make_allocation_config(
        get_allocator("sensitivity"), {"windows": 2, "seqlen": 16, "grid": [0.3, 0.7], "cache": str(tmp_path / "t")}
    )
    model = tiny_model("llama").eval()
    ctx = context(model)
    get_allocator("sensitivity").allocate(ctx, cfg)
    measured = len(calls)
    model.cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ignoring sensitivity cache" warning
        get_allocator("sensitivity").allocate(ctx, cfg)
    assert measured > 0 and len(calls) == measured
