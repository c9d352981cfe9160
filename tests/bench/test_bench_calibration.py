"""`svdkit bench --calib SPEC / --heal-calib SPEC`: named parts keep to the protocol's calibration ranges (never the
test or validation windows), the default stays the protocol's windows, and the spec is a setting a resumed
run must share."""

from __future__ import annotations

import json

import torch
from conftest import assert_error, run_cli

import svdkit.bench.grid as grid
from svdkit.bench.cells import PROTOCOL_CALIBRATION, protocol_spec
from svdkit.sources.mixture import mixture_windows
from svdkit.sources.text import calibration_windows


def _argv(folder, data_dir, out, *extra) -> list:
    return [
        "bench", "--model", folder, "--data-dir", data_dir, "--seqlen", 32, "--calib-offset", 0, "--eval-windows", 2,
        "--ptb-windows", 2, "--methods", "svd-llm", "--ratios", 0.4, "--no-speed", "--no-plots", "--no-perplexity",
        "--out", out, *extra,
    ]  # fmt: skip


def test_named_parts_get_the_protocols_ranges(text_file):
    assert protocol_spec("wikitext2", 150000) == "wikitext2[150000:]"
    spec = f"wikitext2:4,ptb:3,demo:2,self:1,{text_file}:1,ptb[0:100]:1"  # an explicit slice is the user's
    want = f"wikitext2[150000:]:4,ptb[32768:]:3,demo[:-32768]:2,self:1,{text_file}[0:]:1,ptb[0:100]:1"
    assert protocol_spec(spec, 150000) == want


def test_the_default_is_the_protocols_windows_and_no_part_touches_test_or_validation_windows():
    wiki, ptb, demo = torch.arange(301_948), torch.arange(10**6, 10**6 + 80_000), torch.arange(-120_000, 0)
    texts = {"wikitext2": wiki, "ptb": ptb, "demo": demo}
    c = PROTOCOL_CALIBRATION
    default = mixture_windows(protocol_spec(c.source, c.offset), 32, 2048, c.offset, c.seed, texts=texts)
    assert torch.equal(default, calibration_windows(wiki, 32, 2048, 150000, 0))  # what the bench always drew
    mixed = mixture_windows(protocol_spec("wikitext2:8,ptb:8,demo:8", 150000), 24, 2048, 150000, 0, texts=texts)
    starts = mixed[:, 0]
    assert (starts[:8] >= 150000).all()  # after the evaluation windows and the validation slice
    assert (starts[8:16] - 10**6 >= 32768).all()  # after PTB's 8 test and 8 validation windows
    assert (mixed[16:, -1] < -32768).all()  # every token before the docs' last 16 windows


def test_a_mixed_bench_calibrates_on_its_spec_records_it_and_refuses_another(
    capsys, tmp_path, tiny_folder, data_dir, text_file, monkeypatch
):
    seen = []
    collect = grid.collect_statistics

    def collecting(model, arch, windows, *args, **kwargs):
        seen.append(windows)
        return collect(model, arch, windows, *args, **kwargs)

    monkeypatch.setattr(grid, "collect_statistics", collecting)
    out = tmp_path / "bench"
    spec = f"wikitext2:2,{text_file}:3"
    code, _, err = run_cli(capsys, *_argv(tiny_folder, data_dir, out, "--calib", spec))
    assert code == 0, err
    report = json.loads((out / "results.json").read_text())
    assert report["calibration"]["source"] == spec and report["calibration"]["samples"] == 5
    (windows,) = seen
    assert windows.shape == (5, 32)
    wiki = grid.tokenize(grid.load_model(tiny_folder)[1], (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text())
    assert torch.equal(windows[:2], calibration_windows(wiki, 2, 32, 0, 0))  # the --data-dir text
    assert f"`--calib {spec}`: 5 windows of 32 tokens" in (out / "results.md").read_text()
    code, _, err = run_cli(capsys, *_argv(tiny_folder, data_dir, out, "--calib", f"wikitext2:3,{text_file}:2"))
    assert code == 2 and "holds results of other settings" in err
    code, _, err = run_cli(capsys, *_argv(tiny_folder, data_dir, out))  # the default is another setting too
    assert code == 2 and "holds results of other settings" in err
    del report["calibration"]["source"]  # a file written before --calib existed: the protocol's text
    (out / "results.json").write_text(json.dumps(report))
    code, printed, err = run_cli(capsys, *_argv(tiny_folder, data_dir, out, "--calib-samples", 5))
    assert code == 0 and "resuming: 1 finished cells" in printed, err


def test_bad_bench_specs_fail_before_the_model_loads(capsys, tmp_path, data_dir):
    argv = _argv(tmp_path / "no-model", data_dir, tmp_path / "bench")
    code, _, err = run_cli(capsys, *argv, "--calib", "wikitext2:4,ptb")
    assert_error(code, err, "'ptb' lack(s) one")
    code, _, err = run_cli(capsys, *argv, "--heal-calib", "demo")
    assert_error(code, err, "--heal-calib is the healing cells' text, but no cell heals (+heal:NAME)")
    argv[argv.index("svd-llm")] = "svd-llm+heal:kd"
    code, _, err = run_cli(capsys, *argv, "--heal-calib", "self[1:]")
    assert_error(code, err, "--heal-calib: calibration part 'self[1:]': 'self' is written by the model")
