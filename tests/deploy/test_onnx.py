"""The ONNX Runtime export: one graph with a KV cache; perplexity and greedy tokens equal torch's; int8 / int4
weights; the model card; refusals. Skipped where onnxruntime is not installed (`pip install 'svdkit[onnx]'`)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_error, compressed, last_json, random_tokens, run_cli, tiny_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import svdkit  # noqa: E402
from svdkit.deploy import OnnxCausalLM  # noqa: E402
from svdkit.measure.perplexity import perplexity  # noqa: E402


def _greedy_torch(model, ids, n):
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gemma", "gemma3", "qwen3", "qwen3-sliding"])
def test_export_runs_like_torch(tmp_path, kind):
    """Every tiny architecture, compressed: perplexity equal to 1e-5 relative, greedy tokens identical (prompts
    longer than a sliding window included), the low-rank layers exported as two MatMuls."""
    import onnx

    model, result, _ = compressed(kind, "svd-llm", 0.4)
    out = tmp_path / "onnx"
    manifest = svdkit.export_onnx(model, None, out)
    assert manifest["max_relative_logit_difference"] < 1e-5
    onnx_model = OnnxCausalLM(out)
    ids = random_tokens(4 * 48, seed=3)
    want = perplexity(model, source=ids, seqlen=48, progress=False)
    got = perplexity(onnx_model, source=ids, seqlen=48, progress=False)
    assert got.ppl == pytest.approx(want.ppl, rel=1e-5) and got.params == want.params == result.params
    row = ids[None, :20].numpy()  # a generation prefill computes the last position's logits only
    full, _ = onnx_model.step(row, onnx_model.empty_cache(), 0)
    last, _ = onnx_model.step(row, onnx_model.empty_cache(), 0, last=True)
    assert full.shape[1] == 20 and last.shape[1] == 1 and abs(last[0, 0] - full[0, -1]).max() < 1e-5
    prompts = random_tokens(2 * 20, seed=4).view(2, 20)
    assert torch.equal(
        onnx_model.generate(prompts, max_new_tokens=12, min_new_tokens=12), _greedy_torch(model, prompts, 12)
    )
    graph = onnx.load(out / "model.onnx", load_external_data=False)
    matmuls = sum(node.op_type == "MatMul" for node in graph.graph.node)
    lowrank = sum(isinstance(m, svdkit.LowRankLinear) for m in model.modules())
    assert lowrank > 0 and matmuls >= 2 * lowrank
    assert "logits_to_keep" in {i.name for i in graph.graph.input} and manifest["version"] == 2
    assert (out / "README.md").read_text().count("svd-llm") >= 1
    with pytest.raises(svdkit.SvdkitError, match="prompt is empty"):
        onnx_model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)


def test_cli_export_eval_generate(capsys, tmp_path, tiny_folder, text_file):
    """The command line: compress, export the compressed and the dense folder, eval and generate both runtimes
    with the same numbers; generate --json reports the decode rate apart from the prompt."""
    comp = tmp_path / "comp"
    calib = ["--calib", text_file, "--calib-samples", "2", "--calib-seqlen", "32"]
    code, _, err = run_cli(capsys, "compress", tiny_folder, "--ratio", "0.4", *calib, "--output", comp)
    assert code == 0, err
    for source, target in ((comp, tmp_path / "comp-onnx"), (tiny_folder, tmp_path / "dense-onnx")):
        code, out, err = run_cli(capsys, "export", source, "--format", "onnx", "--output", target, "--json")
        assert code == 0, err
        assert "[torch.onnx]" not in out and [ln for ln in err.splitlines() if ln.strip() and "it/s]" not in ln] == []
        assert last_json(out)["weights"] == "float32" and (target / "model.onnx").is_file()
        results = {}
        for model in (source, target):
            code, out, err = run_cli(capsys, "eval", model, "--dataset", text_file, "--seqlen", "32", "--json")
            assert code == 0, err
            ppl = last_json(out)["ppl"]
            code, out, err = run_cli(
                capsys, "generate", model, "--prompt", "The quick brown", "--max-new-tokens", "8", "--json"
            )
            assert code == 0, err
            results[model] = (ppl, last_json(out))
        (p_torch, g_torch), (p_onnx, g_onnx) = results[source], results[target]
        assert p_onnx == pytest.approx(p_torch, rel=1e-3)
        assert g_onnx["tokens"] == g_torch["tokens"] and g_onnx["runtime"] == "onnxruntime"
        for g in (g_torch, g_onnx):
            assert g["decode_tokens_per_s"] > 0 and g["decoded_tokens"] == len(g["tokens"]) - 1 and g["prompt_s"] > 0
    card = (tmp_path / "comp-onnx" / "README.md").read_text()
    assert card.startswith("---\n") and "ONNX export" in card and "bytes on disk" in card
    assert "compressed" not in (tmp_path / "dense-onnx" / "README.md").read_text().split("---")[1]


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_weights_are_smaller_and_close(tmp_path, weights):
    """int8 / int4 quantize every MatMul weight (MatMulNBits): the factors, the dense matrices and the tied
    lm_head alike, and the embedding (GatherBlockQuantized); the weights shrink, and the logits stay near the
    float32 graph's."""
    import onnx
    from onnx import numpy_helper

    def weight_bytes(folder):
        graph = onnx.load(folder / "model.onnx").graph
        return graph, sum(numpy_helper.to_array(t).nbytes for t in graph.initializer)

    model, _, _ = compressed("llama", "svd-llm", 0.4)
    svdkit.export_onnx(model, None, tmp_path / "f32")
    small = svdkit.export_onnx(model, None, tmp_path / weights, weights=weights)
    (_, full_bytes), (graph, small_bytes) = weight_bytes(tmp_path / "f32"), weight_bytes(tmp_path / weights)
    assert small_bytes < full_bytes * (0.36 if weights == "int8" else 0.22)
    ops = [node.op_type for node in graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops
    lowrank = sum(isinstance(m, svdkit.LowRankLinear) for m in model.modules())
    matrices = 2 * lowrank + sum(isinstance(m, torch.nn.Linear) for m in model.modules())  # lm_head included
    assert ops.count("MatMulNBits") == matrices
    assert small["max_relative_logit_difference"] < (0.05 if weights == "int8" else 0.3)
    assert json.loads((tmp_path / weights / "svdkit_onnx.json").read_text())["weights"] == weights


def test_export_refusals(capsys, tmp_path, tiny_folder, tiny_tokenizer):
    svdkit.export_onnx(tiny_model(), None, tmp_path / "no-tokenizer")
    code, _, err = run_cli(capsys, "eval", tmp_path / "no-tokenizer")
    assert_error(code, err, "has no usable tokenizer")
    onnx_dir = tmp_path / "o"
    svdkit.export_onnx(tiny_model(), tiny_tokenizer, onnx_dir)
    code, _, err = run_cli(capsys, "export", onnx_dir, "--output", tmp_path / "again")
    assert_error(code, err, "already an ONNX export")
    code, _, err = run_cli(capsys, "generate", onnx_dir, "--kv-cache", "latent")
    assert_error(code, err, "latent KV cache is for torch models")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    code, _, err = run_cli(capsys, "export", tiny_folder, "--output", tmp_path / "busy")
    assert_error(code, err, "not empty")
    code, _, err = run_cli(capsys, "eval", onnx_dir, "--device", "cuda:0")
    assert code == 2 and "error" in err
    assert not (tmp_path / "again").exists()


def test_a_wrong_graph_is_refused_and_nothing_written(tmp_path, monkeypatch):
    """If ONNX Runtime's logits do not match torch's, the export stops with one error and leaves no folder."""
    from svdkit.deploy import runtime

    real = runtime.OnnxCausalLM.__call__
    monkeypatch.setattr(
        runtime.OnnxCausalLM,
        "__call__",
        lambda self, ids, **kw: type(real(self, ids))(logits=real(self, ids).logits + 1.0),
    )
    with pytest.raises(svdkit.SvdkitError, match="differ from the torch model"):
        svdkit.export_onnx(tiny_model(), None, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and list(tmp_path.iterdir()) == []


def test_saved_folders_carry_a_model_card(tmp_path, tiny_tokenizer):
    model, _, _ = compressed("llama", "svd-llm", 0.4)
    svdkit.save(model, tiny_tokenizer, tmp_path / "c")
    card = (tmp_path / "c" / "README.md").read_text()
    assert "method: `svd-llm`" in card and "q_proj" in card and "trust_remote_code=True" in card
    assert f"{svdkit.count_parameters(model):,}" in card and svdkit.__version__ in card
