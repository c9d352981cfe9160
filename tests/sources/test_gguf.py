"""A ``.gguf`` model loads as a plain float model that compresses and saves, through the same conversion the
bundled SmolLM2 alias uses; the GGUF is a tiny Llama written here with the gguf package."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from conftest import last_json, run_cli, tiny_model

import svdkit
from svdkit.sources import models

LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _llama_cpp_order(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows in llama.cpp's rotary order (what its converter writes and transformers undoes on load)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_name(key: str) -> str:
    if key == "model.embed_tokens.weight":
        return "token_embd.weight"
    if key == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, *module, _ = key.split(".")
    return f"blk.{layer}.{LAYER_TENSORS['.'.join(module)]}.weight"


def _write_metadata(w: gguf.GGUFWriter, cfg, tokenizer) -> None:
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = {**bpe["model"]["vocab"], **{t["content"]: t["id"] for t in bpe["added_tokens"]}}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    types = [1] * len(vocab)  # normal tokens, and special ones as control tokens
    for t in bpe["added_tokens"]:
        types[t["id"]] = 3 if t["special"] else 1
    w.add_token_list(sorted(vocab, key=vocab.get))
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in bpe["model"]["merges"]])
    w.add_bos_token_id(vocab[tokenizer.eos_token])  # transformers 5.0 reads one
    w.add_eos_token_id(vocab[tokenizer.eos_token])


def write_tiny_gguf(path, tokenizer) -> torch.nn.Module:
    """Write the tiny Llama (float32, tied embeddings) and `tokenizer` as a GGUF file; returns the model."""
    model = tiny_model("llama")
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    _write_metadata(w, cfg, tokenizer)
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":  # tied: a GGUF without output.weight ties them
            continue
        if key.endswith("q_proj.weight"):
            t = _llama_cpp_order(t, cfg.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            t = _llama_cpp_order(t, cfg.num_key_value_heads)
        w.add_tensor(_tensor_name(key), t.detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture()
def tiny_gguf(tmp_path, tiny_tokenizer):
    path = tmp_path / "gguf" / "tiny-llama.F32.gguf"
    path.parent.mkdir()
    return path, write_tiny_gguf(path, tiny_tokenizer)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(5, 45)[None]).logits


def test_a_gguf_file_loads_as_a_plain_model_that_saves(tiny_gguf, tiny_tokenizer, tmp_path):
    path, source = tiny_gguf
    model, tok = svdkit.load_model(path, progress=False)
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert torch.equal(_logits(model), _logits(source))
    plain = {"add_special_tokens": False}  # transformers 5.0 puts a BOS token first
    assert (
        tok("The quick brown fox", **plain)["input_ids"] == tiny_tokenizer("The quick brown fox", **plain)["input_ids"]
    )
    svdkit.save(model, tok, tmp_path / "saved")
    loaded, _ = svdkit.load(tmp_path / "saved")
    assert torch.equal(_logits(loaded), _logits(source))


def test_compress_takes_a_gguf_file_to_a_saved_folder(capsys, tiny_gguf, text_file, tmp_path):
    path, _ = tiny_gguf
    out = tmp_path / "small"
    argv = ["--calib", text_file, "--calib-samples", "2", "--calib-seqlen", "32", "--device", "cpu"]
    code, stdout, err = run_cli(capsys, "compress", path, "--ratio", "0.4", *argv, "--output", out, "--json")
    assert code == 0, err
    summary = last_json(stdout)
    assert summary["output"] == str(out) and summary["params"] < summary["params_dense"]
    model, _ = svdkit.load(out)
    assert svdkit.count_parameters(model) == summary["params"]


def test_the_bundled_alias_converts_through_the_same_function(tiny_gguf, tmp_path, monkeypatch):
    path, source = tiny_gguf
    monkeypatch.setenv("SVDKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "bundled_gguf", lambda: path)
    model, _ = svdkit.load_model(models.SMOLLM2_ALIAS, progress=False)
    folder = models.smollm2_folder(progress=False)
    assert (folder / "model.safetensors").is_file() and "quantization_config" not in json.loads(
        (folder / "config.json").read_text()
    )
    assert torch.equal(_logits(model), _logits(source))
