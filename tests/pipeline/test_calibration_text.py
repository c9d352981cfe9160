"""Calibration text in the pipeline: read_windows draws mixtures and ``self`` (from the still-dense model), the
record keeps the spec and its parts, the healers train on --heal-calib's windows (recorded; refused without
--heal), and a streamed compression refuses ``self`` before any work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_error, last_json, random_tokens, run_cli, tiny_model

import svdkit
import svdkit.pipeline.compress as pipeline_compress
import svdkit.sources.checkpoint
import svdkit.sources.selftext
from svdkit.errors import NotStreamable, SvdkitError
from svdkit.pipeline.options import CalibrationSettings, CompressionOptions
from svdkit.pipeline.streaming import compress_folder, partial_path
from svdkit.sources.mixture import mixture_windows
from svdkit.sources.selftext import self_windows
from svdkit.sources.text import calibration_windows, source_tokens


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDKIT_CACHE", str(tmp_path / "cache"))


def _windows_seen(monkeypatch) -> dict:
    """Capture the windows the calibration pass and the heal stage get."""
    seen: dict = {}
    calibrate, heal = pipeline_compress.calibrate, pipeline_compress.heal_stage

    def calibrating(plan, model, windows):
        seen["calibration"] = windows
        return calibrate(plan, model, windows)

    def healing(plan, model, dense, windows):
        seen["healing"] = windows
        return heal(plan, model, dense, windows)

    monkeypatch.setattr(pipeline_compress, "calibrate", calibrating)
    monkeypatch.setattr(pipeline_compress, "heal_stage", healing)
    return seen


def test_a_mixture_is_drawn_recorded_and_used(tiny_tokenizer, text_file, monkeypatch):
    seen = _windows_seen(monkeypatch)
    model = tiny_model()
    spec = f"{text_file}:3,{text_file}[100:400]:2"
    svdkit.compress(model, tiny_tokenizer, method="svd-llm", calib=spec, calib_seqlen=32, device="cpu", progress=False)
    ids = source_tokens(tiny_tokenizer, text_file)
    alone = torch.cat([calibration_windows(ids, 3, 32, 0, 0), calibration_windows(ids[:400], 2, 32, 100, 0)])
    assert torch.equal(seen["calibration"], alone)
    record = model.config.svdkit["calibration"]
    assert record["source"] == spec and record["samples"] == 5
    assert [(p["windows"], p["start"], p["end"]) for p in record["parts"]] == [(3, 0, None), (2, 100, 400)]


def test_self_text_comes_from_the_dense_model_and_is_recorded(tiny_tokenizer, cache, monkeypatch):
    seen = _windows_seen(monkeypatch)
    model, dense = tiny_model(), tiny_model()
    svdkit.compress(model, tiny_tokenizer, calib="self:3", calib_seqlen=16, seed=4, device="cpu", progress=False)
    assert torch.equal(seen["calibration"], self_windows(dense, tiny_tokenizer, 3, 16, 4))  # the cache: same model
    part = model.config.svdkit["calibration"]["parts"][0]
    assert part == {"source": "self", "windows": 3, "start": None, "end": None, "generation": 1}


def test_the_healers_train_on_the_heal_text_which_is_recorded(capsys, tmp_path, tiny_tokenizer, text_file, monkeypatch):
    seen = _windows_seen(monkeypatch)
    model, calib = tiny_model(), random_tokens(4 * 32, seed=1)
    heal = {"heal": "kd", "heal_options": {"kd.max_steps": 1, "kd.seqlen": 16}}
    kw = dict(calib=calib, calib_samples=4, calib_seqlen=32, device="cpu", progress=False, **heal)
    svdkit.compress(model, tiny_tokenizer, heal_calib=f"{text_file}[50:]:3", **kw)
    want = mixture_windows(f"{text_file}[50:]:3", 3, 32, 0, 0, tiny_tokenizer)
    assert torch.equal(seen["healing"], want) and not torch.equal(seen["calibration"][:3], want)
    (record,) = model.config.svdkit["heal"]
    assert record["calibration"]["source"] == f"{text_file}[50:]:3" and record["calibration"]["samples"] == 3
    assert model.config.svdkit["calibration"]["source"] == "token ids"
    svdkit.save(model, tiny_tokenizer, tmp_path / "healed")
    code, stdout, _ = run_cli(capsys, "info", tmp_path / "healed")
    assert code == 0 and f"healing text: {text_file}[50:]:3, 3 windows of 32 tokens" in stdout
    other = tiny_model()
    svdkit.compress(other, tiny_tokenizer, heal_calib=str(text_file), **kw)  # no N: the calibration's count
    assert seen["healing"].shape == (4, 32) and torch.equal(
        seen["healing"], mixture_windows(text_file, 4, 32, 0, 0, tiny_tokenizer)
    )


def test_the_heal_text_is_refused_without_healing(capsys, tmp_path, text_file):
    with pytest.raises(SvdkitError, match=r"heal_calib \(--heal-calib\) is the healing text: it needs healing"):
        CompressionOptions(heal_calib="demo")
    code, _, err = run_cli(
        capsys, "compress", tmp_path / "no-model", "--heal-calib", "demo", "--output", tmp_path / "o"
    )
    assert_error(code, err, "it needs healing (--heal NAMES)")  # before the (missing) model is looked at
    code, _, err = run_cli(
        capsys, "compress", tmp_path / "no-model", "--heal", "kd", "--heal-calib", "demo:x", "--output", tmp_path / "o"
    )
    assert_error(code, err, "heal_calib: calibration part 'demo:x': N (its window count) must be a positive integer")


def test_a_streamed_compression_refuses_self_before_any_work(capsys, tmp_path, tiny_folder, cache, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("no text may be written")

    real = svdkit.sources.selftext.generate_windows
    monkeypatch.setattr(svdkit.sources.selftext, "generate_windows", never)
    options = CompressionOptions(method="svd-llm", calibration=CalibrationSettings("self:2", seqlen=32), progress=False)
    with pytest.raises(NotStreamable, match="calibration text 'self' is written by the dense model") as e:
        compress_folder(tiny_folder, tmp_path / "out", options)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not partial_path(tmp_path / "out").exists()
    monkeypatch.setattr(svdkit.sources.checkpoint, "available_memory", lambda: 1)  # a folder larger than memory
    argv = ["compress", tiny_folder, "--calib", "self:2", "--calib-seqlen", 32, "--output", tmp_path / "out"]
    code, _, err = run_cli(capsys, *argv)
    assert_error(code, err, "calibration text 'self' is written by the dense model, which a generation pass needs")
    assert "so the whole model must be loaded" in err and not (tmp_path / "out").exists()
    monkeypatch.undo()  # a folder that fits: loaded whole, then compressed on the text it wrote
    monkeypatch.setenv("SVDKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(svdkit.sources.selftext, "generate_windows", real)
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    assert "loading the whole model into memory: calibration text 'self'" in out
    assert last_json(out)["params"] < last_json(out)["params_dense"]
    record = json.loads((tmp_path / "out" / "config.json").read_text())["svdkit"]["calibration"]
    assert record["source"] == "self:2" and record["parts"][0]["generation"] == 1


def test_compress_notes_a_calibration_on_one_text(capsys, tmp_path, tiny_folder, text_file):
    """The default (Python's docs alone) calibrates one domain: compress says so in one line; a mixture not."""
    code, out, err = run_cli(capsys, "compress", tiny_folder, "--calib-seqlen", 32, "--output", tmp_path / "one")
    assert code == 0, err
    assert "note: calibrated on one text (demo); outside its domain perplexity can be many times dense" in out
    mixture = ["--calib", f"demo:2,{text_file}:2", "--calib-seqlen", 32, "--output", tmp_path / "two"]
    code, out, err = run_cli(capsys, "compress", tiny_folder, *mixture)
    assert code == 0, err
    assert "note: calibrated" not in out


@pytest.mark.parametrize("text", [" \n\t  \n" * 4000, "word " * 4000])
def test_a_degenerate_calibration_text_gets_a_warning(capsys, tmp_path, tiny_folder, text):
    path = tmp_path / "calib.txt"
    path.write_text(text)
    argv = ["compress", tiny_folder, "--calib", path, "--calib-samples", 2, "--calib-seqlen", 32]
    code, out, err = run_cli(capsys, *argv, "--output", tmp_path / "out")
    assert code == 0, err
    assert "svdkit: warning: the calibration windows hold only" in err and "give a real text" in err


def test_a_real_text_gets_no_such_warning(capsys, tmp_path, tiny_folder, text_file):
    argv = ["compress", tiny_folder, "--calib", text_file, "--calib-samples", 2, "--calib-seqlen", 32]
    code, _, err = run_cli(capsys, *argv, "--output", tmp_path / "out")
    assert code == 0 and "distinct token" not in err, err
