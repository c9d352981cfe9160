"""`svdkit bench`: the grid, its measurements, plots, resuming, and bad input; the speed helpers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TEXT, random_tokens, tiny_model

from svdkit import LowRankLinear, compress
from svdkit.bench.plots import whitened_spectra
from svdkit.calibration.statistics import LinearStats
from svdkit.cli import main
from svdkit.core.compat import cache_kwarg
from svdkit.measure.speed import decode_tokens_per_second, prefill_peak_mb, saved_size_mb, weights_mb


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def data_dir(tmp_path):
    d = tmp_path / "data"
    (d / "wikitext-2-raw").mkdir(parents=True)
    (d / "ptb").mkdir()
    (d / "wikitext-2-raw" / "wiki.test.raw").write_text(TEXT * 3)
    (d / "ptb" / "ptb.valid.txt").write_text(TEXT.lower() * 2)
    return d


def _grid(folder, data_dir, out, *extra):
    return [
        "bench",
        "--model",
        folder,
        "--data-dir",
        data_dir,
        "--seqlen",
        32,
        "--calib-samples",
        4,
        "--calib-offset",
        0,
        "--eval-windows",
        2,
        "--ptb-windows",
        2,
        "--decode-tokens",
        4,
        "--out",
        out,
        *extra,
    ]


def test_bench_grid_measures_plots_and_resumes(capsys, tmp_path, tiny_folder, data_dir):
    out = tmp_path / "bench"
    argv = _grid(tiny_folder, data_dir, out, "--methods", "svd", "svd-llm-v2@v2", "--ratios", 0.3, 0.5)
    code, printed, err = run(capsys, *argv)
    assert code == 0, err
    report = json.loads((out / "results.json").read_text())
    cells = report["cells"]
    assert [(c["method"], c["allocation"], c["ratio"]) for c in cells] == [
        ("svd", "uniform", 0.3),
        ("svd", "uniform", 0.5),
        ("svd-llm-v2", "v2", 0.3),
        ("svd-llm-v2", "v2", 0.5),
    ]
    dense = report["dense"]
    for c in [dense, *cells]:
        assert c["prefill_tok_s"] > 0 and c["forward_tok_s"] > 0 and c["decode_tok_s"] > 0 and c["file_mb"] > 0
    for c in cells:  # the dense model, timed alongside each cell
        assert set(c["reference"]) == {"prefill_tok_s", "forward_tok_s", "decode_tok_s"}
    for c in cells:
        assert c["params"] < dense["params"]
        assert c["weights_mb"] < dense["weights_mb"] and c["file_mb"] < dense["file_mb"]
        assert c["compress_peak_rss_mb"] > 0 and c["decomposition_s"] >= 0
    assert report["cells"][3]["params"] < report["cells"][2]["params"]  # more removed at 0.5
    md = (out / "results.md").read_text()
    assert "## Speed and memory" in md and "| svd-llm-v2 | v2 | 0.5 |" in md
    plots = {p.name for p in (out / "plots").iterdir()}
    assert {"ppl_vs_ratio.png", "spectra.png", "ranks-svd-llm-v2-v2-0.3.png", "ranks-svd-llm-v2-v2-0.5.png"} <= plots
    assert not any(name.startswith("ranks-svd-uniform") for name in plots)  # uniform ranks: no map

    # a rerun with one more ratio computes only the new cells and keeps the finished ones as they were
    code, printed, err = run(capsys, *argv[:-4], "--methods", "svd", "--ratios", 0.3, 0.4, "--out", out)
    assert code == 0, err
    assert "resuming: 4 finished cells" in printed
    assert "spectra plot is skipped" in printed  # plain svd needs no statistics: no pass only for the plot
    again = json.loads((out / "results.json").read_text())
    assert [c["ratio"] for c in again["cells"][:2]] == [0.3, 0.4]
    assert again["cells"][0] == cells[0]
    assert len(again["cells"]) == 5  # the cells not asked for this time are kept


def test_bench_refuses_bad_cells_and_other_settings(capsys, tmp_path, tiny_folder, data_dir):
    out = tmp_path / "bench"
    code, _, err = run(capsys, *_grid(tiny_folder, data_dir, out, "--methods", "svd+fast"))
    assert code == 2 and "unknown flag(s) ['fast']" in err and not out.exists()
    code, _, err = run(capsys, *_grid(tiny_folder, data_dir, out, "--methods", "nosuch"))
    assert code == 2 and "unknown method 'nosuch'" in err and not out.exists()
    code, _, err = run(capsys, *_grid(tiny_folder, data_dir, out, "--methods", "svd@nosuch"))
    assert code == 2 and "unknown allocation 'nosuch'" in err
    code, _, err = run(capsys, *_grid(tiny_folder, tmp_path / "nodata", out, "--methods", "svd", "--ratios", 0.5))
    assert code == 2 and "the protocol's text is missing" in err
    argv = _grid(tiny_folder, data_dir, out, "--methods", "svd", "--ratios", 0.5, "--no-speed", "--no-plots")
    assert run(capsys, *argv)[0] == 0
    report = json.loads((out / "results.json").read_text())
    assert "prefill_tok_s" not in report["cells"][0] and not (out / "plots").exists()
    argv[argv.index("--eval-windows") + 1] = "1"
    code, _, err = run(capsys, *argv)
    assert code == 2 and "holds results of other settings" in err
    assert json.loads((out / "results.json").read_text()) == report  # untouched


def test_bench_passes_records_and_resumes_on_the_rank_multiple(capsys, tmp_path, tiny_folder, data_dir):
    out = tmp_path / "bench"
    argv = _grid(tiny_folder, data_dir, out, "--methods", "svd-llm", "--ratios", 0.4, "--no-speed", "--no-plots")
    assert run(capsys, *argv, "--rank-multiple", 16)[0] == 0
    report = json.loads((out / "results.json").read_text())
    ranks = report["cells"][0]["ranks"].values()
    assert report["rank_multiple"] == 16 and all(k % 16 == 0 or k < 16 for k in ranks) and max(ranks) >= 16
    assert "- ranks: rounded to multiples of 16" in (out / "results.md").read_text()
    code, _, err = run(capsys, *argv)  # the default, 8, is another setting
    assert code == 2 and "holds results of other settings" in err
    del report["rank_multiple"]  # a file written before the option existed held exact ranks
    (out / "results.json").write_text(json.dumps(report))
    code, printed, err = run(capsys, *argv, "--rank-multiple", 1)
    assert code == 0 and "resuming: 1 finished cells" in printed, err


def test_weights_and_file_size_shrink_with_low_rank_layers():
    model = tiny_model()
    dense_w, dense_f = weights_mb(model), saved_size_mb(model)
    compress(model, None, method="svd", ratio=0.5, progress=False)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    assert weights_mb(model) < dense_w and saved_size_mb(model) < dense_f
    tensors = list(model.parameters()) + list(model.buffers())  # parameters() counts tied weights once
    assert weights_mb(model) == pytest.approx(sum(t.numel() * t.element_size() for t in tensors) / 2**20)


def test_decode_and_prefill_memory_are_measured():
    model = tiny_model()
    ids = random_tokens(64)
    assert decode_tokens_per_second(model, ids[:8], new_tokens=5, repeats=1) > 0
    peak = prefill_peak_mb(model, ids)
    assert peak is None or peak >= 0


def test_prefill_is_a_generation_prefill_and_forward_scores_every_position():
    from svdkit.measure import speed

    model = tiny_model()
    ids = random_tokens(64)
    seen = []
    hook = model.register_forward_hook(lambda mod, args, kwargs, out: seen.append((kwargs, out)), with_kwargs=True)
    assert speed.prefill_tokens_per_second(model, ids, repeats=1) > 0
    kwargs, out = seen[-1]
    assert out.logits.shape[1] == 1 and kwargs[cache_kwarg(model.forward)].get_seq_length() == 64  # cache filled
    seen.clear()
    assert speed.forward_tokens_per_second(model, ids, repeats=1) > 0
    assert seen[-1][1].logits.shape[1] == 64 and seen[-1][0]["use_cache"] is False
    hook.remove()


def test_whitened_spectrum_is_the_plain_one_under_identity_gram_and_tilts_otherwise():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False))
    eye = LinearStats({"gram": torch.eye(6, dtype=torch.float64) * 10}, 10, "0")
    plain, white = whitened_spectra(model, {"0": eye}, ["0"])["0"]
    assert plain == pytest.approx(white)
    # a Gram matrix that silences all but one input channel leaves one non-zero whitened component
    one = torch.zeros(6, 6, dtype=torch.float64)
    one[0, 0] = 5.0
    _, white = whitened_spectra(model, {"0": LinearStats({"gram": one}, 5, "0")}, ["0"])["0"]
    assert white[0] == 1.0 and max(white[1:]) < 1e-12


def test_paired_speed_times_the_models_in_alternation():
    from svdkit.measure.speed import paired_speed

    a, b = tiny_model(), tiny_model(seed=1)
    order: list[str] = []
    a.register_forward_hook(lambda *_: order.append("a"))
    b.register_forward_hook(lambda *_: order.append("b"))
    out = paired_speed({"a": a, "b": b}, random_tokens(32), new_tokens=0, repeats=2)
    assert set(out) == {"a", "b"} and all(v > 0 for d in out.values() for v in d.values())
    assert set(out["a"]) == {"prefill_tok_s", "forward_tok_s"}  # no decode asked for
    # warm-ups (prefill, forward) of each, then per round: prefill a, prefill b, forward a, forward b
    assert order == ["a", "a", "b", "b"] + ["a", "b", "a", "b"] * 2
