"""A saved folder loads as the compressed model with or without svdkit, or refuses: never a dense model
with random projections (the svdkit format, svdkit/saved/format.py and modeling_svdkit.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import compress_small, random_tokens, tiny_model

import svdkit
from svdkit.core.lowrank import LowRankLinear

KINDS = ("llama", "qwen2", "mistral", "gemma", "gemma3", "qwen3")

WITHOUT_SVDKIT = """
import json, sys, torch
sys.modules["svdkit"] = None  # any import of svdkit fails
from transformers import AutoModelForCausalLM
out = {}
for folder in sys.argv[1:]:
    try:
        AutoModelForCausalLM.from_pretrained(folder)
        refused = None
    except Exception as e:
        refused = f"{type(e).__name__}: {e}"
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    except Exception as e:
        out[folder] = {"refused": refused, "error": f"{type(e).__name__}: {e}"}
        continue
    ids = torch.load(folder + "/ids.pt")
    with torch.no_grad():
        torch.save(model(ids).logits, folder + "/remote.pt")
    low = [n for n, m in model.named_modules() if type(m).__name__ in ("LowRankLinear", "QuantLowRankLinear")]
    out[folder] = {"refused": refused, "class": type(model).__name__, "low_rank": low}
print("\\nRESULT", json.dumps(out))
"""


def without_svdkit(tmp_path, *folders) -> dict:
    """Load each folder in a fresh Python that cannot import svdkit: with and without trust_remote_code."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_SVDKIT, *map(str, folders)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.rsplit("RESULT", 1)[1])  # transformers' trust prompt is on stdout too


def saved(tmp_path, tokenizer, kind: str = "llama", name: str = "out"):
    """A tiny model of `kind` compressed by svd-llm at 0.4 and saved: (model, folder, ids, logits)."""
    model = tiny_model(kind)
    compress_small(model, method="svd-llm", ratio=0.4)
    folder = tmp_path / name
    svdkit.save(model, tokenizer, folder)
    ids = random_tokens(24, seed=3)[None]
    torch.save(ids, folder / "ids.pt")
    with torch.no_grad():
        logits = model(ids).logits
    return model, folder, ids, logits


def test_without_svdkit_a_folder_loads_as_the_compressed_model_only_with_trust_remote_code(tmp_path, tiny_tokenizer):
    folders, expected = [], {}
    for kind in KINDS:
        model, folder, _, logits = saved(tmp_path, tiny_tokenizer, kind, kind)
        folders.append(folder)
        expected[str(folder)] = (logits, sorted(n for n, m in model.named_modules() if isinstance(m, LowRankLinear)))
    report = without_svdkit(tmp_path, *folders)
    for folder, (logits, low_rank) in expected.items():
        got = report[folder]
        assert got["refused"] and "trust_remote_code" in got["refused"], got  # transformers' own refusal
        assert "error" not in got, got
        assert got["class"].startswith("Svdkit") and sorted(got["low_rank"]) == low_rank
        torch.testing.assert_close(torch.load(f"{folder}/remote.pt"), logits, rtol=0, atol=1e-5)


def test_without_svdkit_a_quantized_base_loads_too(tmp_path, tiny_tokenizer):
    """qlr's folder (a 4-bit base in MatMulNBits' layout under each pair) through the folder's own code."""
    model = tiny_model("llama")
    compress_small(model, method="qlr", method_options={"rank": 4})
    folder = tmp_path / "qlr"
    svdkit.save(model, tiny_tokenizer, folder)
    ids = random_tokens(24, seed=3)[None]
    torch.save(ids, folder / "ids.pt")
    got = without_svdkit(tmp_path, folder)[str(folder)]
    assert "error" not in got, got
    assert sorted(got["low_rank"]) == sorted(n for n, m in model.named_modules() if isinstance(m, LowRankLinear))
    with torch.no_grad():
        torch.testing.assert_close(torch.load(f"{folder}/remote.pt"), model(ids).logits, rtol=0, atol=1e-5)


def test_with_svdkit_plain_from_pretrained_builds_the_same_model(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model, folder, ids, logits = saved(tmp_path, tiny_tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    q = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, LowRankLinear) and q.rank == model.model.layers[0].self_attn.q_proj.rank
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)
    assert loaded.config.svdkit["ranks"] == model.config.svdkit["ranks"]


def test_save_pretrained_and_a_second_save_write_the_portable_format(tmp_path, tiny_tokenizer):
    model, folder, ids, logits = saved(tmp_path, tiny_tokenizer)
    model.save_pretrained(tmp_path / "hf")  # what push_to_hub writes too
    reloaded, _ = svdkit.load(folder)
    svdkit.save(reloaded, tiny_tokenizer, tmp_path / "again")
    for where in (tmp_path / "hf", tmp_path / "again"):
        config = json.loads((where / "config.json").read_text())
        assert config["model_type"] == "svdkit_llama" and config["svdkit"]["ranks"] == model.config.svdkit["ranks"]
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_svdkit.SvdkitLlamaForCausalLM"
        assert (where / "modeling_svdkit.py").read_text() == (folder / "modeling_svdkit.py").read_text()


def test_densify_writes_a_plain_model_of_the_base_type(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model, folder, ids, logits = saved(tmp_path, tiny_tokenizer)
    loaded, tok = svdkit.load(folder)
    svdkit.densify(loaded, tok, tmp_path / "dense")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (
        "svdkit" not in config and "auto_map" not in config and not (tmp_path / "dense" / "modeling_svdkit.py").exists()
    )
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert type(dense) is LlamaForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, logits, rtol=1e-4, atol=1e-4)
    assert type(loaded).__name__ == "SvdkitLlamaForCausalLM"  # densify copies: the loaded model is unchanged


def test_a_legacy_folder_still_loads_and_saves_in_the_current_format(tmp_path, tiny_tokenizer):
    model, folder, ids, logits = saved(tmp_path, tiny_tokenizer)
    config = json.loads((folder / "config.json").read_text())  # rewrite as svdkit <= 0.x wrote it
    record = config.pop("svdkit")
    config.pop("auto_map")
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    config["quantization_config"] = {"quant_method": "svdkit", **record}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_svdkit.py").unlink()
    legacy, _ = svdkit.load(folder)
    with torch.no_grad():
        torch.testing.assert_close(legacy(ids).logits, logits, rtol=0, atol=0)
    svdkit.save(legacy, tiny_tokenizer, tmp_path / "current")
    current = json.loads((tmp_path / "current" / "config.json").read_text())
    assert current["model_type"] == "svdkit_llama" and "quantization_config" not in current
    assert current["svdkit"]["ranks"] == record["ranks"]


def test_a_model_class_transformers_does_not_map_its_config_to_is_refused(tiny_tokenizer):
    from transformers import LlamaForCausalLM

    class Custom(LlamaForCausalLM):
        pass

    model = tiny_model()
    model.__class__ = Custom
    with pytest.raises(svdkit.SvdkitError, match="cannot be saved in svdkit's format"):
        compress_small(model, method="svd-llm", ratio=0.4)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())  # refused before any work
