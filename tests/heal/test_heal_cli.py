"""``svdkit compress --heal``: the whole-model path, the curves file, ``svdkit info``, Ctrl-C."""

from __future__ import annotations

import json

from conftest import assert_error, last_json, run_cli

import svdkit.heal.block
import svdkit.sources.checkpoint
from svdkit.sources.checkpoint import dense_bytes


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
    assert "loading the whole model into memory: healing 'kd' trains the whole model against the dense one" in stdout
    assert "healing block:" in stdout and "healing kd:" in stdout
    curves = json.loads((out / "healing.json").read_text())
    assert set(curves) == {"block", "kd"} and len(curves["block"]["layers"]) == 2
    assert curves["kd"]["held_out_curve"][0]["step"] == 0
    code, stdout, err = run_cli(capsys, "info", out, "--json")
    assert code == 0, err
    assert "healing block:" in stdout and [h["name"] for h in last_json(stdout)["heal"]] == ["block", "kd"]


def test_distillation_is_refused_before_loading_where_its_training_state_does_not_fit(
    capsys, tmp_path, tiny_folder, text_file, monkeypatch
):
    weights = dense_bytes(tiny_folder, 0.0, 4)  # the model fits, kd's copies beside it (1 + 1 + 3 x 0.6) do not
    monkeypatch.setattr(svdkit.sources.checkpoint, "available_memory", lambda: int(3 * weights))
    code, _, err = run_cli(capsys, *_argv(tiny_folder, text_file, tmp_path / "out"), "--heal", "kd")
    assert_error(code, err, "healing 'kd' trains the whole model against the dense one")
    assert "3.8 times that with the healing's training state" in err and not (tmp_path / "out").exists()
    code, stdout, err = run_cli(capsys, *_argv(tiny_folder, text_file, tmp_path / "block"), "--heal", "block")
    assert code == 0 and "healing block:" in stdout, err  # streams: no check of the whole model


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
    code, _, err = run_cli(capsys, *_argv(tiny_folder, text_file, tmp_path / "out"), "--heal", "block,kd")
    assert code == 130 and err.strip().splitlines()[-1] == "svdkit: interrupted by SIGINT"
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_block_healing_streams_and_a_ctrl_c_keeps_the_healed_layers_for_resume(
    capsys, tmp_path, tiny_folder, text_file, monkeypatch
):
    """--heal block streams layer by layer (no whole-model load): interrupted in layer 1, it keeps layer 0 healed
    and written; --resume finishes with the same record as a run never interrupted."""
    fit, calls = svdkit.heal.block._fit, []

    def interrupted_in_layer_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fit(*args, **kwargs)

    argv = [*_argv(tiny_folder, text_file, tmp_path / "whole"), "--heal", "block"]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0 and "loading the whole model" not in stdout and "healing block:" in stdout, err
    monkeypatch.setattr(svdkit.heal.block, "_fit", interrupted_in_layer_1)
    argv = [*_argv(tiny_folder, text_file, tmp_path / "out"), "--heal", "block"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 130 and "--resume" in err
    state = json.loads((tmp_path / ".out.svdkit-partial" / "state.json").read_text())
    assert state["layers_done"] == 1 and set(state["records"][0]["block"]) >= {"held_out_start", "held_out_best"}
    monkeypatch.setattr(svdkit.heal.block, "_fit", fit)
    code, stdout, err = run_cli(capsys, *argv, "--resume")
    assert code == 0, err
    whole, resumed = (
        json.loads((tmp_path / d / "config.json").read_text())["svdkit"]["heal"] for d in ("whole", "out")
    )
    for record in (whole, resumed):
        record[0].pop("seconds")
    assert resumed == whole and whole[0]["held_out_best"] < whole[0]["held_out_start"]


def test_a_diverged_held_out_loss_keeps_the_start_says_so_and_writes_valid_json(
    capsys, tmp_path, tiny_folder, text_file
):
    out = tmp_path / "out"
    argv = [*_argv(tiny_folder, text_file, out)[:-4], "--calib-samples", "2", "--calib-seqlen", "32", "--output", out]
    options = ["kd.lr=1e30", "kd.clip=1e30", "kd.every=1", "kd.seqlen=16"]
    code, stdout, err = run_cli(capsys, *argv, "--heal", "kd", *[x for o in options for x in ("--heal-option", o)])
    assert code == 0, err
    assert "healing kd: " in stdout and "no step improved it, the start is kept" in stdout

    def reject(constant):
        raise AssertionError(f"{constant} is not JSON")

    curves = json.loads((out / "healing.json").read_text(), parse_constant=reject)
    assert curves["kd"]["held_out_curve"][-1]["held_out"] is None  # the diverged measurement
    config = json.loads((out / "config.json").read_text(), parse_constant=reject)
    assert config["svdkit"]["heal"][0]["held_out_best"] == config["svdkit"]["heal"][0]["held_out_start"]
