"""``svdkit compress --heal``: the whole-model path, the curves file, ``svdkit info``, Ctrl-C."""

from __future__ import annotations

import json

from conftest import assert_error, last_json, run_cli

import svdkit.heal.block


def _argv(folder, text_file, out) -> list:
    return [
        "compress", folder, "--ratio", "0.4", "--calib", text_file, "--calib-samples", "4", "--calib-seqlen", "32",
        "--device", "cpu", "--output", out,
    ]  # fmt: skip


def test_compress_heal_loads_whole_writes_curves_and_info_shows_it(capsys, tmp_path, tiny_folder, text_file):
    out = tmp_path / "out"
    argv = [*_argv(tiny_folder, text_file, out), "--heal", "block,kd", "--heal-option", "kd.seqlen=16"]
    code, stdout, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    assert "loading the whole model into memory: healing trains the factors against the dense model" in stdout
    assert "healing block:" in stdout and "healing kd:" in stdout
    curves = json.loads((out / "healing.json").read_text())
    assert set(curves) == {"block", "kd"} and len(curves["block"]["layers"]) == 2
    assert curves["kd"]["held_out_curve"][0]["step"] == 0
    code, stdout, err = run_cli(capsys, "info", out, "--json")
    assert code == 0, err
    assert "healing block:" in stdout and [h["name"] for h in last_json(stdout)["heal"]] == ["block", "kd"]


def test_bad_heal_flags_fail_before_loading(capsys, tmp_path, tiny_folder, text_file):
    code, _, err = run_cli(capsys, *_argv(tiny_folder, text_file, tmp_path / "out"), "--heal", "distil")
    assert_error(code, err, "unknown healing 'distil'; known healings: block, kd")
    argv = [*_argv(tiny_folder, text_file, tmp_path / "out"), "--heal", "kd", "--heal-option", "block.lr=1"]
    code, _, err = run_cli(capsys, *argv)
    assert_error(code, err, "heal_options key 'block.lr' is for healing 'block', which this run does not do")
    assert not (tmp_path / "out").exists()


def test_ctrl_c_during_healing_exits_130_and_writes_nothing(capsys, tmp_path, tiny_folder, text_file, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(svdkit.heal.block, "_fit", interrupted)  # in the middle of the first layer
    code, _, err = run_cli(capsys, *_argv(tiny_folder, text_file, tmp_path / "out"), "--heal", "block")
    assert code == 130 and err.strip().splitlines()[-1] == "svdkit: interrupted by SIGINT"
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
