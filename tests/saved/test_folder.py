"""The saved folder: saving is atomic and refuses to clobber, it records method, ratio, ranks and
version, reloads (also in plain transformers) to the same logits, and densifies to a plain model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compressed, random_tokens, tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

import svdkit
from svdkit import LowRankLinear
from svdkit.saved.contents import folder_info


def small_compressed():
    model = tiny_model()
    svdkit.compress(
        model,
        method="svd-llm",
        ratio=0.5,
        calib=random_tokens(128),
        calib_samples=2,
        calib_seqlen=64,
        device="cpu",
        progress=False,
    )
    return model


def test_saved_folder_records_the_compression(tmp_path, tiny_tokenizer):
    model = small_compressed()
    svdkit.save(model, tiny_tokenizer, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "svdkit_llama" and config["architectures"] == ["SvdkitLlamaForCausalLM"]
    record = config["svdkit"]
    assert record["method"] == "svd-llm" and record["ratio"] == 0.5
    assert record["version"] == svdkit.__version__ and len(record["ranks"]) == 14
    assert record["calibration"]["samples"] == 2
    info = folder_info(tmp_path / "out")
    assert info["params"] == svdkit.count_parameters(model)  # counted from the safetensors headers
    assert info["params_dense"] == svdkit.count_parameters(tiny_model())
    assert info["ranks"] == record["ranks"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_existing_output_is_refused_unless_overwrite(tmp_path, tiny_tokenizer):
    model = small_compressed()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(svdkit.SvdkitError, match="exists and is not empty"):
        svdkit.save(model, tiny_tokenizer, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    svdkit.save(model, tiny_tokenizer, out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()


def test_interrupted_save_leaves_nothing_that_looks_complete(tmp_path, tiny_tokenizer, monkeypatch):
    model = small_compressed()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_tokenizer, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        svdkit.save(model, tiny_tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


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
    assert svdkit.load(tmp_path / "again")[0].config.svdkit["ranks"] == result.ranks
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


def test_a_signal_during_the_replacement_waits_until_the_new_folder_is_in_place(tmp_path, tiny_tokenizer, monkeypatch):
    import os
    import signal

    from svdkit.cli import main

    model = small_compressed()
    svdkit.save(model, tiny_tokenizer, tmp_path / "out")
    replace = os.replace

    def terminated_midway(src, dst):  # SIGTERM arrives just as the old folder is moved aside
        replace(src, dst)
        if str(dst).endswith("out") and ".old-" in str(dst):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(os, "replace", terminated_midway)
    monkeypatch.setattr("svdkit.cli.densify.run", lambda a: svdkit.save(model, tiny_tokenizer, tmp_path / "out", True))
    assert main(["densify", str(tmp_path / "in"), "--output", str(tmp_path / "x")]) == 143
    assert (tmp_path / "out" / "config.json").is_file()  # the new folder, complete
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_save_killed_between_the_two_renames_gets_its_old_folder_back(tmp_path, tiny_tokenizer):
    from conftest import dead_pid, mark_owner

    model = small_compressed()
    svdkit.save(model, tiny_tokenizer, tmp_path / "out")
    old = tmp_path / ".out.old-killed"
    old.mkdir()
    (tmp_path / "out").rename(old / "out")  # what kill -9 between the renames leaves
    mark_owner(old, dead_pid())
    with pytest.raises(svdkit.SvdkitError, match="exists and is not empty"):  # the old folder is back, not lost
        svdkit.save(model, tiny_tokenizer, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file() and [p.name for p in tmp_path.iterdir()] == ["out"]
