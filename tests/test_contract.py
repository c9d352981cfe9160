"""The contract every method meets on tiny models: real low-rank layers, exact parameter counts,
finite outputs, and a save/load round trip that reproduces the logits."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

import svdkit
from svdkit import LowRankLinear, rank_for_ratio
from svdkit.core.ranks import align_ranks

METHODS = svdkit.method_names()
KINDS = ["llama", "llama-bias", "qwen2", "mistral", "gemma", "gemma3", "qwen3-sliding"]


def compressed(kind: str, method: str, ratio: float = 0.4):
    model = tiny_model(kind)
    dense = svdkit.count_parameters(model)
    calib = random_tokens(4 * 64, seed=1)
    result = svdkit.compress(
        model, method=method, ratio=ratio, calib=calib, calib_samples=4, calib_seqlen=64, device="cpu", progress=False
    )
    return model, result, dense


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
    uniform = sum(rank_for_ratio(m, n, 0.4) * (m + n) for m, n, _ in shapes.values())
    kept = sum(k * (m + n) for m, n, k in shapes.values())
    assert all(k % 8 == 0 for _, _, k in shapes.values())  # the default rank_multiple
    if svdkit.get_method(method).stage is None:
        exact = svdkit.allocate_uniform({n: (m, k_in) for n, (m, k_in, _) in shapes.items()}, 0.4)
        assert result.ranks == align_ranks(exact, {n: (m, k_in) for n, (m, k_in, _) in shapes.items()}, 8)
        assert uniform - 8 * max(m + n for m, n, _ in shapes.values()) < kept <= uniform
    else:  # a whole-model stage (soco) spends the uniform allocation's budget its own way
        assert uniform - 8 * max(m + n for m, n, _ in shapes.values()) < kept <= uniform
        assert len({k for _, _, k in shapes.values()}) > 1
    saved = sum(m * n - k * (m + n) for m, n, k in shapes.values())
    assert result.params_dense == dense and result.params == dense - saved == svdkit.count_parameters(model)
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    assert type(model.get_output_embeddings()) is nn.Linear
    with torch.no_grad():
        logits = model(input_ids=random_tokens(40, seed=2)[None]).logits
    assert torch.isfinite(logits).all()
    record = model.config.quantization_config
    assert record.method == method and record.ratio == 0.4 and record.ranks == result.ranks


@pytest.mark.parametrize("kind", ["llama", "llama-bias", "qwen2"])
def test_save_load_round_trip_reproduces_logits(kind, tmp_path, tiny_tokenizer):
    model, result, _ = compressed(kind, "svd-llm")
    ids = random_tokens(50, seed=3)[None]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    svdkit.save(model, tiny_tokenizer, tmp_path / "out")
    loaded, tok = svdkit.load(tmp_path / "out")
    assert isinstance(loaded.model.layers[1].mlp.down_proj, LowRankLinear)
    assert svdkit.count_parameters(loaded) == result.params
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    # plain transformers, once svdkit is imported
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, expected)
    assert tok("hello")["input_ids"] == tiny_tokenizer("hello")["input_ids"]
    # the reloaded model is an ordinary float model again: it re-saves and casts
    svdkit.save(loaded, tok, tmp_path / "again")
    assert svdkit.load(tmp_path / "again")[0].config.quantization_config.ranks == result.ranks
    loaded.to(torch.float64)
    loaded.half()


def test_densify_writes_a_plain_model_with_the_same_outputs(tmp_path, tiny_tokenizer):
    model, _, dense = compressed("llama", "svd-llm")
    ids = random_tokens(30, seed=4)[None]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    svdkit.densify(model, tiny_tokenizer, tmp_path / "dense")
    assert isinstance(model.model.layers[0].self_attn.q_proj, LowRankLinear)  # the source is unchanged
    config = (tmp_path / "dense" / "config.json").read_text()
    assert "svdkit" not in config
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    assert svdkit.count_parameters(plain) == dense
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-4)


def test_svd_llm_tracks_the_dense_model_better_than_plain_svd():
    ids = random_tokens(4 * 64, seed=1).reshape(4, 64)
    with torch.no_grad():
        ref = tiny_model()(input_ids=ids).logits
    err = {}
    for method in ("svd", "svd-llm"):
        model, _, _ = compressed("llama", method, ratio=0.3)
        with torch.no_grad():
            err[method] = float((model(input_ids=ids).logits - ref).square().mean())
    assert err["svd-llm"] < err["svd"]


def test_precomputed_statistics_give_the_same_model_as_the_streaming_pass():
    from svdkit.calibration.collect import collect_statistics
    from svdkit.sources.text import calibration_windows

    calib = random_tokens(4 * 64, seed=1)
    streamed, _, _ = compressed("llama", "svd-llm")
    model = tiny_model("llama")
    windows = calibration_windows(calib, 4, 64)  # the windows compress() draws from the same ids
    stats = collect_statistics(
        model, svdkit.find_architecture(model), windows, {"gram"}, torch.device("cpu"), progress=False
    )
    result = svdkit.compress(model, method="svd-llm", ratio=0.4, statistics=stats, device="cpu", progress=False)
    assert model.config.quantization_config.calibration["statistics"] == "precomputed"
    assert result.ranks == streamed.config.quantization_config.ranks
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
    assert model.config.quantization_config.calibration["sequential"] is True
    first = "model.layers.0.self_attn.q_proj"
    last = "model.layers.1.mlp.down_proj"
    # layer 0 sees the same inputs either way; layer 1 sees the compressed layer 0's outputs
    assert torch.equal(model.get_submodule(first).A, dense_mode.get_submodule(first).A)
    assert not torch.allclose(model.get_submodule(last).A, dense_mode.get_submodule(last).A)


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
