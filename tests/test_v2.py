"""SVD-LLM V2: loss-optimized truncation (exact math on small matrices) and heterogeneous allocation."""

from __future__ import annotations

import pytest
import torch
from conftest import correlated_inputs

from svdkit import SvdkitError
from svdkit.calibration.statistics import LinearStats
from svdkit.methods import get_method, make_config
from svdkit.methods.linalg import eigen_whitening, robust_cholesky, whitened_singular_values

pytestmark = pytest.mark.usefixtures("float64_default")
W = torch.randn(12, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def stats_of(X: torch.Tensor) -> LinearStats:
    return LinearStats({"gram": X @ X.T}, tokens=X.shape[1])


def product(method: str, W, stats, k, **opts) -> torch.Tensor:
    m = get_method(method)
    A, B = m.decompose(W, stats, k, make_config(m, opts))
    assert A.shape == (k, W.shape[1]) and B.shape == (W.shape[0], k)
    return B @ A


@pytest.mark.parametrize("k", [1, 4, 8])
def test_v2_equals_svd_llm_on_a_full_rank_gram(k):
    X = correlated_inputs(9, 40)
    assert torch.allclose(product("svd-llm-v2", W, stats_of(X), k), product("svd-llm", W, stats_of(X), k), atol=1e-9)


def test_v2_loss_is_the_dropped_whitened_singular_values():
    X = correlated_inputs(9, 40)
    sv = whitened_singular_values(W, X @ X.T)
    L, _ = robust_cholesky(X @ X.T)
    assert torch.allclose(sv, torch.linalg.svdvals(W @ L), rtol=1e-9)  # any square root of G
    for k in (2, 5):
        err = ((W - product("svd-llm-v2", W, stats_of(X), k)) @ X).norm()
        assert float(err) == pytest.approx(float(sv[k:].norm()), rel=1e-8)


def test_v2_on_a_rank_deficient_gram_needs_no_jitter_and_is_optimal():
    X = correlated_inputs(9, 5)  # 5 tokens, 9 channels: G has rank 5
    G = X @ X.T
    assert robust_cholesky(G)[1] > 0  # Cholesky would need jitter here
    S, _ = eigen_whitening(G)
    assert S.shape == (9, 5)
    sv = torch.linalg.svdvals(W @ S)
    W3 = product("svd-llm-v2", W, stats_of(X), 3)
    assert float(((W - W3) @ X).norm()) == pytest.approx(float(sv[3:].norm()), rel=1e-6)
    # jittered Cholesky (SVD-LLM) is no better on the calibration inputs
    W3_v1 = product("svd-llm", W, stats_of(X), 3)
    assert float(((W - W3) @ X).norm()) <= float(((W - W3_v1) @ X).norm()) + 1e-9


def test_v2_spare_ranks_keep_w_outside_the_reached_directions():
    """Ranks beyond the 5 reached directions hold the residual's SVD: at full rank W' = W exactly,
    and in between W' is exact on the calibration inputs and closer to W elsewhere."""
    X = correlated_inputs(9, 5)
    assert torch.allclose(product("svd-llm-v2", W, stats_of(X), 9), W, atol=1e-8)
    W5, W7 = (product("svd-llm-v2", W, stats_of(X), k) for k in (5, 7))
    assert torch.allclose(W5 @ X, W @ X, atol=1e-8) and torch.allclose(W7 @ X, W @ X, atol=1e-8)
    assert (W7 - W).norm() < (W5 - W).norm()


def test_v2_zero_gram_is_a_clear_error():
    with pytest.raises(ValueError, match="zero"):
        product("svd-llm-v2", W, LinearStats({"gram": torch.zeros(9, 9)}, tokens=4), 3)


@pytest.mark.parametrize("floor", [-1e-3, 1.0, float("nan"), "tiny"])
def test_v2_bad_floor_is_a_clear_error(floor):
    with pytest.raises(SvdkitError, match=r"rel_floor must be a number in \[0, 1\)"):
        make_config(get_method("svd-llm-v2"), {"rel_floor": floor})


# --- heterogeneous allocation -------------------------------------------------------------------

import math  # noqa: E402

from conftest import random_tokens, tiny_model  # noqa: E402

import svdkit  # noqa: E402
from svdkit.allocators.v2 import group_of, heterogeneous_ratios  # noqa: E402


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


def _compress(model, **kw):
    calib = random_tokens(4 * 32, seed=1)
    opts = dict(calib=calib, calib_samples=4, calib_seqlen=32, device="cpu", progress=False)
    return svdkit.compress(model, **{**opts, **kw})


@pytest.mark.parametrize("method", ["svd-llm-v2", "svd"])
def test_compress_with_v2_allocation(method, tmp_path, tiny_tokenizer):
    model = tiny_model("llama")
    shapes = svdkit.find_architecture(model).shapes()
    uniform = _compress(tiny_model("llama"), method=method, ratio=0.4)
    r = _compress(model, method=method, ratio=0.4, allocation="v2", statistics_dir=tmp_path / "stats")
    assert r.ranks != uniform.ranks  # heterogeneous
    # every type keeps uniform's budget up to rank flooring: the whole model within a few ranks of it
    budget = sum((1 - 0.4) * m * n for m, n in shapes.values())
    used = sum(k * sum(shapes[n]) for n, k in r.ranks.items()) + sum(math.prod(shapes[n]) for n in r.dense_kept)
    assert used <= budget + 1e-6 and used >= budget - sum(sum(s) for s in shapes.values())
    assert model.config.quantization_config.allocation["name"] == "v2"
    assert "ratio_range" in r.allocation
    assert list((tmp_path / "stats").iterdir()) == []  # the spilled statistics are gone
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
    r = _compress(model, method="svd-llm-v2", ratio=0.4, allocation="v2")
    ranks = [r.ranks.get(f"model.layers.{i}.self_attn.q_proj", 10**6) for i in range(2)]
    assert ranks[1] > ranks[0]


def test_v2_allocation_bad_options():
    with pytest.raises(SvdkitError, match=r"strength must be a number in \[-10, 10\]"):
        _compress(tiny_model("llama"), method="svd-llm-v2", allocation="v2", allocation_options={"strength": 11})
    for key, value, fragment in (("rule", "cubic", "rule must be 'log' or 'power'"), ("loss", "l1", "loss must be")):
        with pytest.raises(SvdkitError, match=fragment):
            _compress(tiny_model("llama"), method="svd-llm-v2", allocation="v2", allocation_options={key: value})
    with pytest.raises(SvdkitError, match="min_ratio 0.5 is above max_ratio 0.4"):
        _compress(
            tiny_model("llama"),
            method="svd-llm-v2",
            allocation="v2",
            allocation_options={"min_ratio": 0.5, "max_ratio": 0.4},
        )


# --- the statistics store -----------------------------------------------------------------------


def test_store_round_trip_matches_memory_and_cleans_up(tmp_path):
    from svdkit.calibration.collect import collect_statistics
    from svdkit.calibration.store import StatisticsStore
    from svdkit.sources.text import calibration_windows

    model = tiny_model("llama")
    arch = svdkit.find_architecture(model)
    windows = calibration_windows(random_tokens(4 * 32, seed=1), 4, 32)
    mem = collect_statistics(model, arch, windows, {"gram", "mean_abs"}, torch.device("cpu"), progress=False)
    with StatisticsStore(tmp_path) as store:
        got = collect_statistics(model, arch, windows, {"gram", "mean_abs"}, torch.device("cpu"), False, store=store)
        assert got is store and sorted(store) == sorted(mem) and len(store) == len(mem)
        for name, st in mem.items():
            assert torch.equal(store[name]["gram"], st["gram"]) and store[name].tokens == st.tokens
            assert torch.equal(store[name].mean_abs, st.mean_abs)
        # q/k/v share one Gram matrix: it is written once per layer
        assert store.bytes < 2 * sum(
            st["gram"].numel() * 8
            for n, st in mem.items()
            if n.endswith(("q_proj", "o_proj", "gate_proj", "down_proj"))
        )
        store.add("model.layers.0.self_attn.q_proj", {"fisher": torch.ones(64)}, 128)
        assert (
            "fisher" in store["model.layers.0.self_attn.q_proj"] and "gram" in store["model.layers.0.self_attn.q_proj"]
        )
        folder = store.path
        assert folder.parent == tmp_path and any(folder.iterdir())
    assert not folder.exists()


# --- the least-squares update -------------------------------------------------------------------

from svdkit.pipeline.update import lstsq_update  # noqa: E402


def _factors(method, W, X, k):
    m = get_method(method)
    return m.decompose(W, stats_of(X), k, make_config(m, {}))


def test_lstsq_update_is_the_least_squares_optimum_for_fixed_a():
    X = correlated_inputs(9, 40)
    G = X @ X.T / 40
    A, B = _factors("svd", W, X, 4)
    B1 = lstsq_update(W, A, B, G)
    expected = torch.linalg.lstsq((A @ X).T, (W @ X).T).solution.T  # argmin_B ||W X - B A X||
    assert torch.allclose(B1, expected, atol=1e-9)
    assert ((W - B1 @ A) @ X).norm() < ((W - B @ A) @ X).norm()


def test_lstsq_update_changes_nothing_after_svd_llm():
    X = correlated_inputs(9, 40)
    A, B = _factors("svd-llm", W, X, 4)
    assert torch.allclose(lstsq_update(W, A, B, X @ X.T / 40), B, atol=1e-9)


def test_lstsq_update_with_other_inputs_fits_the_dense_outputs():
    """Sequential calibration: the compressed layer sees X2, the dense one X. B fits W X from A X2."""
    X = correlated_inputs(9, 40)
    X2 = X + 0.3 * correlated_inputs(9, 40, seed=3)
    A, B = _factors("svd-llm", W, X2, 4)
    B1 = lstsq_update(W, A, B, X2 @ X2.T / 40, X @ X2.T / 40)
    expected = torch.linalg.lstsq((A @ X2).T, (W @ X).T).solution.T
    assert torch.allclose(B1, expected, atol=1e-8)


def test_lstsq_update_keeps_b_where_the_inputs_never_reach():
    """V2's spare ranks hold W on unreached directions; the refit must not zero them."""
    X = correlated_inputs(9, 5)
    A, B = _factors("svd-llm-v2", W, X, 7)
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
        r = _compress(model, method=method, ratio=0.4, update=update, rank_multiple=1)
        assert model.config.quantization_config.update == update and r.params < svdkit.count_parameters(dense)
        with torch.no_grad():
            errs[update] = float((model(input_ids=X_ids).logits - ref).norm())
    assert errs["lstsq"] < errs["none"]


def test_unknown_update_is_a_clear_error():
    with pytest.raises(SvdkitError, match="unknown update 'ridge'; known: none, lstsq"):
        _compress(tiny_model("llama"), update="ridge")


def test_two_stream_cross_statistic(tmp_path):
    """Without any replacement both streams are the dense one, so C = G exactly; once layer 0 is
    compressed, layer 1's C is the dense inputs against the compressed model's inputs."""
    from svdkit.calibration.collect import iterate_layers
    from svdkit.sources.text import calibration_windows

    model = tiny_model("llama")
    arch = svdkit.find_architecture(model)
    windows = calibration_windows(random_tokens(4 * 32, seed=1), 4, 32)
    for item in iterate_layers(
        model, arch, windows, {"gram", "cross"}, torch.device("cpu"), sequential=True, progress=False
    ):
        for st in item.stats.values():
            assert torch.allclose(st["cross"], st["gram"], rtol=1e-6, atol=1e-6)
    seen = {}
    for item in iterate_layers(
        model, arch, windows, {"gram", "cross"}, torch.device("cpu"), sequential=True, progress=False
    ):
        seen.update({(item.index, name): st for name, st in item.stats.items()})
        if item.index == 0 and "self_attn.v_proj" in item.stats:
            with torch.no_grad():
                item.layer.self_attn.v_proj.weight.mul_(0.5)  # "compress" layer 0's v_proj
    # the dense stream runs through an unmodified copy: o_proj's inputs differ within layer 0 already
    for key in [(0, "self_attn.o_proj"), (1, "self_attn.q_proj")]:
        assert not torch.allclose(seen[key]["cross"], seen[key]["gram"], rtol=1e-3)
    assert torch.equal(seen[0, "self_attn.q_proj"]["cross"], seen[0, "self_attn.q_proj"]["gram"])
    with pytest.raises(svdkit.SvdkitError, match="needs sequential=True"):
        next(iterate_layers(tiny_model("llama"), arch, windows, {"cross"}, torch.device("cpu"), progress=False))


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
        _compress(model, method="svd-llm", ratio=0.5, sequential=True, update=update)
        with torch.no_grad():
            errs[update] = float((model(input_ids=ids, output_hidden_states=True).hidden_states[-1] - ref).norm())
    assert errs["lstsq"] < 0.8 * errs["none"]


def test_sequential_with_v2_allocation_takes_ranks_from_the_dense_model(tmp_path):
    """A dense pass fixes the ranks (the same as without sequential), then a sequential pass factors."""
    plain = _compress(tiny_model("llama"), method="svd-llm-v2", ratio=0.4, allocation="v2")
    model = tiny_model("llama")
    seq = _compress(
        model, method="svd-llm-v2", ratio=0.4, allocation="v2", sequential=True, update="lstsq", statistics_dir=tmp_path
    )
    assert seq.ranks == plain.ranks and list(tmp_path.iterdir()) == []
    assert model.config.quantization_config.calibration["sequential"] is True
