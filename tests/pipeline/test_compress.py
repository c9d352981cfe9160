"""compress() end to end: precomputed statistics, sequential calibration, ranks aligned to a multiple
with the k/v ranks fixed, and the clear errors for a model it cannot take."""

from __future__ import annotations

import pytest
import torch
from conftest import compressed, random_tokens, tiny_model
from torch import nn

import svdkit
from svdkit.allocators.uniform import allocate_uniform
from svdkit.calibration.collect import collect_statistics
from svdkit.calibration.store import StatisticsStore
from svdkit.core.ranks import align_ranks
from svdkit.sources.text import calibration_windows


def test_precomputed_statistics_give_the_same_model_as_the_streaming_pass():
    calib = random_tokens(4 * 64, seed=1)
    streamed, _, _ = compressed("llama", "svd-llm")
    model = tiny_model("llama")
    windows = calibration_windows(calib, 4, 64)  # the windows compress() draws from the same ids
    stats = collect_statistics(
        model, svdkit.find_architecture(model), windows, {"gram"}, torch.device("cpu"), progress=False
    )
    result = svdkit.compress(model, method="svd-llm", ratio=0.4, statistics=stats, device="cpu", progress=False)
    assert model.config.svdkit["calibration"]["statistics"] == "precomputed"
    assert result.ranks == streamed.config.svdkit["ranks"]
    ids = random_tokens(40, seed=5)[None]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, streamed(input_ids=ids).logits, atol=1e-5)
    with pytest.raises(svdkit.SvdkitError, match="lack"):
        svdkit.compress(tiny_model("llama"), method="svd-llm", ratio=0.4, statistics={}, progress=False)


def test_sequential_mode_compresses_against_the_compressed_prefix():
    calib = random_tokens(4 * 64, seed=1)
    dense_mode, _, _ = compressed("llama", "svd-llm")
    model = tiny_model("llama")
    svdkit.compress(
        model,
        method="svd-llm",
        ratio=0.4,
        calib=calib,
        calib_samples=4,
        calib_seqlen=64,
        sequential=True,
        device="cpu",
        progress=False,
    )
    assert model.config.svdkit["calibration"]["sequential"] is True
    first = "model.layers.0.self_attn.q_proj"
    last = "model.layers.1.mlp.down_proj"
    # layer 0 sees the same inputs either way; layer 1 sees the compressed layer 0's outputs
    assert torch.equal(model.get_submodule(first).A, dense_mode.get_submodule(first).A)
    assert not torch.allclose(model.get_submodule(last).A, dense_mode.get_submodule(last).A)


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "8"])
def test_bad_multiple_is_a_clear_error_before_any_work(bad):
    model = tiny_model("llama")
    with pytest.raises(svdkit.SvdkitError, match="rank_multiple must be a positive integer"):
        svdkit.compress(model, method="svd", ratio=0.4, rank_multiple=bad, progress=False)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"


def test_compress_records_the_multiple_and_exact_ranks_with_one():
    calib = random_tokens(4 * 64, seed=1)
    opts = dict(method="svd-llm", ratio=0.4, calib=calib, calib_samples=4, calib_seqlen=64, progress=False)
    shapes = svdkit.find_architecture(tiny_model("llama")).shapes()
    aligned = svdkit.compress(tiny_model("llama"), rank_multiple=16, **opts)
    exact = svdkit.compress(tiny_model("llama"), rank_multiple=1, **opts)
    assert exact.ranks == {n: k for n, k in allocate_uniform(shapes, 0.4).items() if k is not None}
    assert aligned.ranks == align_ranks(exact.ranks, shapes, 16) != exact.ranks
    assert aligned.allocation["rank_multiple"] == 16 and exact.allocation["rank_multiple"] == 1
    assert aligned.params <= exact.params


def test_kv_ratio_ranks_stay_exact_and_the_rest_is_aligned_on_its_own_budget():
    calib = random_tokens(4 * 64, seed=1)
    opts = dict(method="svd-llm", ratio=0.4, calib=calib, calib_samples=4, calib_seqlen=64, progress=False)
    shapes = svdkit.find_architecture(tiny_model("llama")).shapes()
    r = svdkit.compress(tiny_model("llama"), kv_ratio=0.3, **opts)
    kv = {n: k for n, k in r.ranks.items() if n.endswith(("k_proj", "v_proj"))}
    assert set(kv.values()) == {22}  # floor(0.7 * 32): the cache's size, not rounded
    rest = {n: k for n, k in allocate_uniform(shapes, 0.4).items() if n not in kv}
    assert {n: k for n, k in r.ranks.items() if n not in kv} == align_ranks(rest, shapes, 8)


def test_already_compressed_or_unused_projections_are_clear_errors():
    model, _, _ = compressed("llama", "svd")
    with pytest.raises(svdkit.SvdkitError, match="already compressed"):
        svdkit.compress(model, method="svd", ratio=0.2, progress=False)
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp.unused = nn.Linear(64, 64)  # registered but never called in forward
    with pytest.raises(svdkit.SvdkitError, match=r"model.layers.0.mlp.unused received no input"):
        svdkit.compress(
            model,
            method="svd-llm",
            ratio=0.4,
            calib=random_tokens(128),
            calib_samples=2,
            calib_seqlen=64,
            progress=False,
        )
    assert all(type(m) is nn.Linear for m in model.model.layers[0].mlp.children() if isinstance(m, nn.Linear))


def test_a_store_passed_in_serves_several_compressions_and_stays_the_callers(tmp_path):
    model = tiny_model()
    windows = calibration_windows(random_tokens(4 * 64, seed=1), 4, 64)
    arch = svdkit.find_architecture(model)
    store = collect_statistics(
        model, arch, windows, {"gram"}, torch.device("cpu"), progress=False, store=StatisticsStore(tmp_path)
    )
    try:
        for ratio in (0.2, 0.4):
            r = svdkit.compress(
                tiny_model(), method="svd-llm", ratio=ratio, statistics=store, device="cpu", progress=False
            )
            assert r.timings["calibration"] == 0.0  # no pass of its own
        assert store.path.is_dir() and any(store.path.iterdir())
    finally:
        store.close()
    assert not store.path.exists()
