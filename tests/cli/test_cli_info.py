"""`svdkit info`: the allocation, the parameter update, the rank multiple, the rank map and training curve plots."""

from __future__ import annotations

import json

import pytest
from conftest import assert_error, last_json, run_cli

from svdkit.cli import main


def test_compress_with_v2_allocation_update_and_a_rank_map_plot(capsys, tmp_path, tiny_folder, text_file):
    out = tmp_path / "small"
    common = ["--calib", text_file, "--calib-samples", "3", "--calib-seqlen", "32", "--device", "cpu"]
    argv = ["compress", tiny_folder, "--method", "svd-llm-v2", "--ratio", "0.4", "--allocation", "v2", *common]
    argv += ["--update", "lstsq", "--statistics-dir", tmp_path / "spill", "--output", out]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "chosen ranks by module type" in stdout and "ratio_range" in stdout
    assert not (tmp_path / "spill").exists()  # v2 keeps spectra, spills nothing
    png = tmp_path / "map.png"
    code, stdout, err = run_cli(capsys, "info", out, "--plot", png, "--json")
    assert code == 0, err
    info = last_json(stdout)
    assert info["allocation"]["name"] == "v2" and info["update"] == "lstsq"
    assert "parameter update: lstsq" in stdout and "keeps" in stdout and f"rank map written to {png}" in stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    code, _, err = run_cli(capsys, "info", out, "--plot", tmp_path / "map.txt")
    assert_error(code, err, "ending in .png")
    code, _, err = run_cli(capsys, "info", out, "--plot", tmp_path / "no" / "map.png")
    assert_error(code, err, "does not exist")


def test_info_names_the_rank_multiple(capsys, tmp_path, tiny_folder, text_file):
    out = tmp_path / "small"
    args = ["compress", str(tiny_folder), "--calib", str(text_file), "--calib-samples", "2", "--calib-seqlen", "32"]
    assert main([*args, "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "allocation uniform (ranks in multiples of 8)" in capsys.readouterr().out


def test_cli_soco_writes_its_curve_and_info_plots_it(tmp_path, tiny_folder, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    args = ["compress", str(tiny_folder), "--method", "soco", "--ratio", "0.4", "--calib-samples", "2"]
    args += ["--calib-seqlen", "64", "--option", "steps=4", "--option", "seqlen=32", "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "training: 4 steps" in printed and "chosen ranks by module type" in printed
    curve = json.loads((out / "training_curve.json").read_text())
    assert [row["step"] for row in curve] == [1, 2, 3, 4]
    png = tmp_path / "curve.png"
    assert main(["info", str(out), "--plot-curve", str(png)]) == 0
    assert "training: 4 steps" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (out / "training_curve.json").unlink()
    assert main(["info", str(out), "--plot-curve", str(png)]) == 2
    assert "no training_curve.json" in capsys.readouterr().err
