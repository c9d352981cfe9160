"""Weight-only quantization of an export: the token embedding read by GatherBlockQuantized in MatMulNBits'
layout (a tied head's own tensor, one copy), bytes by part, the rtn / hqq / gptq quantizers and block sizes on
the command line, and the refusals. Skipped where onnxruntime is not installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_error, last_json, run_cli

pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from svdkit.deploy.quantize import Quantization, bytes_by_part, quantize_graph  # noqa: E402
from svdkit.errors import SvdkitError  # noqa: E402

V, H = 96, 80  # H not a multiple of 32: the last block of a row is padded


def _graph(tied: bool) -> onnx.ModelProto:
    """input_ids -> Gather(E) -> "embedding" -> MatMul(E^T, a Transpose where tied) -> "logits"."""
    rng = np.random.default_rng(0)
    E = rng.standard_normal((V, H)).astype(np.float32)
    inits = [numpy_helper.from_array(E, "E")]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["embedding"], name="gather")]
    if tied:
        nodes.append(helper.make_node("Transpose", ["E"], ["E_t"], perm=[1, 0], name="t"))
    else:
        inits.append(numpy_helper.from_array(rng.standard_normal((H, V)).astype(np.float32), "E_t"))
    nodes.append(helper.make_node("MatMul", ["embedding", "E_t"], ["logits"], name="head"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("embedding", "logits")],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _dequantized(model, data: str, scales: str, bits: int, block: int) -> np.ndarray:
    """E (V x H) from MatMulNBits' layout of E^T: rows of blocks of unsigned integers, zero point 2^(bits-1)."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    packed = weights[data].reshape(V, -1)
    if bits == 4:  # two per byte, the low nibble first
        values = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(V, -1)
    else:
        values = packed
    values = values.astype(np.float32) - 2 ** (bits - 1)
    scale = np.repeat(weights[scales].reshape(V, -1), block, axis=1)
    return (values * scale[:, : values.shape[1]])[:, :H]


@pytest.mark.parametrize("bits", [4, 8])
def test_a_tied_head_and_the_embedding_share_one_tensor(bits):
    """The Gather reads the head's MatMulNBits tensor: the embedding is exactly its dequantized rows, the
    logits its product, and no float copy of E is left."""
    model = quantize_graph(_graph(tied=True), Quantization(bits=bits))
    nodes = {n.op_type: n for n in model.graph.node}
    gather, head = nodes["GatherBlockQuantized"], nodes["MatMulNBits"]
    assert gather.input[0] == head.input[1] and "Gather" not in nodes
    assert {t.name for t in model.graph.initializer}.isdisjoint({"E", "E_t"})
    E = _dequantized(model, head.input[1], head.input[2], bits, 32)
    ids = np.array([[3, 0, 95, 41]], dtype=np.int64)
    emb, logits = ort.InferenceSession(model.SerializeToString()).run(None, {"input_ids": ids})
    assert np.allclose(emb[0], E[ids[0]], atol=1e-6)
    assert np.allclose(logits[0], E[ids[0]] @ E.T, rtol=1e-3, atol=1e-3)
    parts = bytes_by_part(model)
    assert parts["head"] == 0 and parts["embedding"] >= V * H * bits // 8


def test_an_untied_embedding_gets_its_own_rounded_copy():
    """Without a tied head the embedding is rounded to nearest on its own: each entry within a step of the
    original, a quarter step on average."""
    original = numpy_helper.to_array(_graph(tied=False).graph.initializer[0])
    model = quantize_graph(_graph(tied=False), Quantization(bits=4, block_size=16))
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    scales = next(n for n in model.graph.node if gather.input[2] in n.output).input[0]
    E = _dequantized(model, gather.input[0], scales, 4, 16)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    step = np.repeat(np.abs(weights[scales]).reshape(V, -1), 16, axis=1)[:, :H]
    error = np.abs(E - original)  # half a step, a step where the symmetric range [-8, 7] clips the top
    assert np.all(error <= step + 1e-6) and error.mean() <= 0.3 * step.mean()
    ids = np.array([[7, 8]], dtype=np.int64)
    emb, _ = ort.InferenceSession(model.SerializeToString()).run(None, {"input_ids": ids})
    assert np.allclose(emb[0], E[ids[0]], atol=1e-6)
    parts = bytes_by_part(model)
    assert parts["head"] > 0 and parts["embedding"] > 0


def test_what_the_quantizers_cannot_write_is_refused():
    for q, match in (
        (Quantization(bits=3), "4 or 8 bits"),
        (Quantization(block_size=48), "power of two"),
        (Quantization(quantizer="awq"), "unknown quantizer"),
        (Quantization(bits=8, quantizer="hqq"), "4-bit weights only"),
    ):
        with pytest.raises(SvdkitError, match=match):
            q.check()
    with pytest.raises(SvdkitError, match="calibration windows"):
        quantize_graph(_graph(tied=True), Quantization(quantizer="gptq"))


@pytest.mark.parametrize(
    "flags",
    [
        ("--weights", "int4", "--quantizer", "gptq", "--calib-samples", "2", "--calib-seqlen", "32"),
        ("--weights", "int4", "--quantizer", "hqq", "--block-size", "64"),
        ("--weights", "int8", "--keep-embedding"),
    ],
)
def test_cli_quantizers(capsys, tmp_path, tiny_folder, text_file, flags):
    """Each quantizer from the command line: recorded in the manifest, bytes by part, perplexity near float32."""
    out = tmp_path / "q"
    flags = (*flags, "--calib", text_file) if "gptq" in flags else flags
    code, stdout, err = run_cli(capsys, "export", tiny_folder, "--output", out, *flags, "--json")
    assert code == 0, err
    manifest = last_json(stdout)
    q = manifest["quantization"]
    assert q["quantizer"] == (flags[3] if flags[2] == "--quantizer" else "rtn")
    assert q["embedding"] == ("--keep-embedding" not in flags) and q["bits"] == (8 if "int8" in flags else 4)
    assert sum(manifest["bytes_by_part"].values()) <= manifest["bytes"]
    ops = [n.op_type for n in onnx.load(out / "model.onnx", load_external_data=False).graph.node]
    assert ops.count("GatherBlockQuantized") == (0 if "--keep-embedding" in flags else 1)
    ppl = {}
    for model in (tiny_folder, out):
        code, stdout, err = run_cli(capsys, "eval", model, "--dataset", text_file, "--seqlen", "32", "--json")
        assert code == 0, err
        ppl[model] = last_json(stdout)["ppl"]
    assert ppl[out] == pytest.approx(ppl[tiny_folder], rel=0.1)


def test_cli_quantizer_refusals(capsys, tmp_path, tiny_folder):
    for flags, fragment in (
        (("--quantizer", "gptq"), "are for int8 / int4 --weights"),
        (("--weights", "int8", "--quantizer", "gptq"), "4-bit weights only"),
        (("--weights", "int4", "--calib-samples", "4"), "add --quantizer gptq"),
        (("--weights", "int4", "--block-size", "24"), "power of two"),
    ):
        code, _, err = run_cli(capsys, "export", tiny_folder, "--output", tmp_path / "x", *flags)
        assert_error(code, err, fragment)
        assert not (tmp_path / "x").exists()


def test_a_quantized_base_exports_as_its_own_codes(tmp_path):
    """qlr's bases run as MatMulNBits of the very codes and scales svdkit made (no requantization): the float32
    export's perplexity is the torch model's, the pairs stay float MatMuls; int4 quantizes only the rest."""
    from conftest import compress_small, random_tokens, tiny_model

    import svdkit
    from svdkit.core.modeling_svdkit import QuantLowRankLinear
    from svdkit.deploy import OnnxCausalLM
    from svdkit.measure.perplexity import perplexity

    model = tiny_model("llama")
    compress_small(model, method="qlr", method_options={"rank": 8})
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLowRankLinear)}
    manifest = svdkit.export_onnx(model, None, tmp_path / "f32")
    assert manifest["max_relative_logit_difference"] < 1e-5
    graph = onnx.load(tmp_path / "f32" / "model.onnx").graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    native = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(native) == len(layers) == 14
    for node in native:
        layer = layers[node.input[1].removesuffix(".qweight")]
        assert np.array_equal(weights[node.input[1]], layer.qweight.numpy())
    ids = random_tokens(4 * 48, seed=3)
    want = perplexity(model, source=ids, seqlen=48, progress=False).ppl
    got = perplexity(OnnxCausalLM(tmp_path / "f32"), source=ids, seqlen=48, progress=False).ppl
    assert got == pytest.approx(want, rel=1e-5)
    apart = Quantization(block_size=64)  # the pairs in other blocks than the bases': B stays a MatMul of its own
    svdkit.export_onnx(model, None, tmp_path / "int4", weights="int4", quantization=apart)
    graph = onnx.load(tmp_path / "int4" / "model.onnx", load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 14 + 2 * 14 + 1  # the bases, the pairs' factors, the head


def test_a_pair_stored_like_its_base_joins_the_base(tmp_path):
    """With the pairs at the base's bits and blocks (int4, 32, rtn), y = [Q | B'] [x ; A x]: one MatMulNBits
    per target besides A's, holding Q's own codes then B rounded to nearest; the export computes what torch
    computes with A and B rounded as stored."""
    import copy

    from conftest import compress_small, random_tokens, tiny_model

    import svdkit
    from svdkit.core.modeling_svdkit import QuantLowRankLinear
    from svdkit.deploy import OnnxCausalLM
    from svdkit.measure.perplexity import perplexity
    from svdkit.methods.blockquant import dequantize, pack, round_to_nearest

    model = tiny_model("llama")
    compress_small(model, method="qlr", method_options={"rank": 8})
    manifest = svdkit.export_onnx(model, None, tmp_path / "int4", weights="int4")
    graph = onnx.load(tmp_path / "int4" / "model.onnx").graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 14 + 14 + 1  # the bases joined with B, the A factors, the head
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    q = model.model.layers[0].mlp.down_proj
    codes, _ = round_to_nearest(q.B.detach().double(), 4, 32)
    joined = pack(torch.cat([q.codes(), codes.to(torch.int16)], 1), 4, 32).numpy()
    assert np.array_equal(weights["model.layers.0.mlp.down_proj.qweight"], joined)
    rounded = copy.deepcopy(model)
    stored = [p for m in rounded.modules() if isinstance(m, QuantLowRankLinear) for p in (m.A, m.B)]
    embedding, head = rounded.get_input_embeddings().weight, rounded.get_output_embeddings().weight
    stored += [embedding] + ([head] if head.data_ptr() != embedding.data_ptr() else [])
    for p in stored:  # as the export stores them: int4 blocks of 32 along each one's inputs
        p.data.copy_(dequantize(*round_to_nearest(p.data.double(), 4, 32), 32).float())
    ids = random_tokens(4 * 48, seed=3)
    want = perplexity(rounded, source=ids, seqlen=48, progress=False).ppl
    got = perplexity(OnnxCausalLM(tmp_path / "int4"), source=ids, seqlen=48, progress=False).ppl
    assert got == pytest.approx(want, rel=1e-4) and manifest["bytes"] > 0
