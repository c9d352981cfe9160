"""Saving is atomic and refuses to clobber; the folder records method, ratio, ranks and version."""

from __future__ import annotations

import json

import pytest
from conftest import random_tokens, tiny_model

import svdkit
from svdkit.saved.folder import folder_info


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
    record = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert record["quant_method"] == "svdkit" and record["method"] == "svd-llm" and record["ratio"] == 0.5
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
