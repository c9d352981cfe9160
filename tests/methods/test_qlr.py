"""qlr, a quantized base plus a low-rank correction: compressed in the pipeline (in memory and streamed from a
folder), recorded, saved and loaded, densified, healed with the base frozen, and what it refuses."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_error, compress_small, last_json, random_tokens, run_cli, tiny_model

import svdkit
from svdkit.bench.cells import parse_spec
from svdkit.core.modeling_svdkit import QuantLowRankLinear
from svdkit.errors import SvdkitError
from svdkit.measure.perplexity import perplexity
from svdkit.methods.blockquant import dequantize, pack, round_to_nearest
from svdkit.saved.kvcache import latent_kv_problem


def _qlr(**options):
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    result = compress_small(model, method="qlr", method_options={"rank": 8, **options})
    return dense, model, result


def test_every_target_gets_a_quantized_base_and_its_correction():
    dense, model, result = _qlr()
    layers = [m for m in model.modules() if isinstance(m, QuantLowRankLinear)]
    assert len(layers) == 14 and {(m.rank, m.bits, m.block) for m in layers} == {(8, 4, 32)}
    record = model.config.svdkit
    assert record["quantized"] == {"bits": 4, "block": 32} and record["ratio"] is None and result.ratio is None
    assert result.quantized == {"bits": 4, "block": 32} and set(result.ranks.values()) == {8}
    ids = random_tokens(4 * 48, seed=3)
    want = perplexity(dense, source=ids, seqlen=48, progress=False).ppl
    assert perplexity(model, source=ids, seqlen=48, progress=False).ppl == pytest.approx(want, rel=0.01)
    # the base is a 4-bit matrix: a scale times an integer in [-8, 7] per block; the pair corrects it toward W
    q = model.model.layers[0].mlp.down_proj
    base = q.quantized_weight().double()
    steps = base / q.scales.double().repeat_interleave(32, dim=1)[:, : base.shape[1]]
    assert torch.allclose(steps, steps.round(), atol=1e-4) and set(steps.round().unique().tolist()) <= set(range(-8, 8))
    assert torch.allclose(q.dense_weight().double(), base + q.B.double() @ q.A.double())
    W = dense.model.layers[0].mlp.down_proj.weight.double()
    assert torch.linalg.norm(q.dense_weight().double() - W) < torch.linalg.norm(base - W)


def test_the_codes_are_packed_as_runtimes_read_them():
    """An rtn base of 8 bits: the stored bytes are exactly the packed rounding of W (MatMulNBits' layout)."""
    dense, model, _ = _qlr(quantizer="rtn", bits=8, iterations=1)
    W = dense.model.layers[1].self_attn.o_proj.weight.double()
    q = model.model.layers[1].self_attn.o_proj
    codes, scales = round_to_nearest(W, 8, 32)
    assert torch.equal(q.qweight, pack(codes, 8, 32)) and torch.allclose(q.scales.double(), scales)
    assert torch.allclose(q.quantized_weight().double(), dequantize(codes, scales), atol=1e-6)


def test_saved_loaded_and_densified_alike(tmp_path, tiny_tokenizer):
    _, model, _ = _qlr()
    svdkit.save(model, tiny_tokenizer, tmp_path / "q")
    loaded, _ = svdkit.load(tmp_path / "q")
    ids = random_tokens(24, seed=5)[None]
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(loaded(ids).logits, want)
    svdkit.densify(loaded, tiny_tokenizer, tmp_path / "dense")
    plain, _ = svdkit.load_model(tmp_path / "dense")
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, want, rtol=0, atol=1e-5)


def test_healing_trains_the_pair_and_leaves_the_base():
    _, plain, _ = _qlr()
    model = tiny_model("llama")
    compress_small(model, method="qlr", method_options={"rank": 8}, heal="block")
    before, after = plain.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.q_proj
    assert torch.equal(before.qweight, after.qweight) and torch.equal(before.scales, after.scales)
    assert not torch.equal(before.A, after.A)


def test_the_lstsq_update_refits_the_pair_to_what_the_base_leaves():
    _, model, _ = _qlr(quantizer="rtn")
    assert model.config.svdkit["update"] == "none"
    refit = tiny_model("llama")
    compress_small(refit, method="qlr", method_options={"rank": 8, "quantizer": "rtn"}, update="lstsq")
    q, r = model.model.layers[0].mlp.up_proj, refit.model.layers[0].mlp.up_proj
    assert torch.equal(q.qweight, r.qweight) and torch.allclose(q.B, r.B, atol=1e-3)  # the whitened fit is optimal


def test_refusals():
    for options, fragment in (
        ({"allocation": "sensitivity"}, "sets every rank itself"),
        ({"kv_ratio": 0.5}, "sets every rank itself"),
        ({"method": "soco", "method_options": {"base": "qlr"}}, "sets its own ranks"),
    ):
        kw = {"method": "qlr", **options}
        with pytest.raises(SvdkitError, match=fragment):
            compress_small(tiny_model("llama"), **kw)
    _, model, _ = _qlr()
    assert "quantized base" in latent_kv_problem(model)
    with pytest.raises(SvdkitError, match="ratio grid does not apply"):
        parse_spec("qlr+heal:block")


def test_cli_streamed_compress_info_eval(capsys, tmp_path, tiny_folder, text_file):
    """From a folder (the streamed path: shards hold the codes), with options on the command line."""
    out = tmp_path / "q"
    calib = ["--calib", text_file, "--calib-samples", "3", "--calib-seqlen", "32"]
    options = ["--option", "rank=4", "--option", "bits=8"]
    code, stdout, err = run_cli(capsys, "compress", tiny_folder, "--method", "qlr", *options, *calib, "--output", out)
    assert code == 0, err
    assert "an 8-bit base in blocks of 32 plus low-rank corrections" in stdout
    code, stdout, err = run_cli(capsys, "info", out, "--json")
    info = last_json(stdout)
    assert code == 0 and info["quantized"] == {"bits": 8, "block": 32} and set(info["ranks"].values()) == {4}
    assert "besides the quantized base" in stdout
    code, stdout, err = run_cli(capsys, "eval", out, "--dataset", text_file, "--seqlen", "32", "--json")
    assert code == 0 and last_json(stdout)["ppl"] > 1
    code, _, err = run_cli(
        capsys,
        "compress",
        tiny_folder,
        "--method",
        "qlr",
        "--allocation",
        "sensitivity",
        *calib,
        "--output",
        tmp_path / "x",
    )
    assert_error(code, err, "sets every rank itself")
