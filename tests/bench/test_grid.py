"""`svdkit bench`: the grid, its measurements, plots, resuming, and bad input."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


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
    code, printed, err = run_cli(capsys, *argv)
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
    code, printed, err = run_cli(capsys, *argv[:-4], "--methods", "svd", "--ratios", 0.3, 0.4, "--out", out)
    assert code == 0, err
    assert "resuming: 4 finished cells" in printed
    assert "spectra plot is skipped" in printed  # plain svd needs no statistics: no pass only for the plot
    again = json.loads((out / "results.json").read_text())
    assert [c["ratio"] for c in again["cells"][:2]] == [0.3, 0.4]
    assert again["cells"][0] == cells[0]
    assert len(again["cells"]) == 5  # the cells not asked for this time are kept


def test_bench_refuses_bad_cells_and_other_settings(capsys, tmp_path, tiny_folder, data_dir):
    out = tmp_path / "bench"
    code, _, err = run_cli(capsys, *_grid(tiny_folder, data_dir, out, "--methods", "svd+fast"))
    assert code == 2 and "unknown flag(s) ['fast']" in err and not out.exists()
    code, _, err = run_cli(capsys, *_grid(tiny_folder, data_dir, out, "--methods", "nosuch"))
    assert code == 2 and "unknown method 'nosuch'" in err and not out.exists()
    code, _, err = run_cli(capsys, *_grid(tiny_folder, data_dir, out, "--methods", "svd@nosuch"))
    assert code == 2 and "unknown allocation 'nosuch'" in err
    code, _, err = run_cli(capsys, *_grid(tiny_folder, tmp_path / "nodata", out, "--methods", "svd", "--ratios", 0.5))
    assert code == 2 and "the protocol's text is missing" in err
    argv = _grid(tiny_folder, data_dir, out, "--methods", "svd", "--ratios", 0.5, "--no-speed", "--no-plots")
    assert run_cli(capsys, *argv)[0] == 0
    report = json.loads((out / "results.json").read_text())
    assert "prefill_tok_s" not in report["cells"][0] and not (out / "plots").exists()
    argv[argv.index("--eval-windows") + 1] = "1"
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "holds results of other settings" in err
    assert json.loads((out / "results.json").read_text()) == report  # untouched


def test_bench_passes_records_and_resumes_on_the_rank_multiple(capsys, tmp_path, tiny_folder, data_dir):
    out = tmp_path / "bench"
    argv = _grid(tiny_folder, data_dir, out, "--methods", "svd-llm", "--ratios", 0.4, "--no-speed", "--no-plots")
    assert run_cli(capsys, *argv, "--rank-multiple", 16)[0] == 0
    report = json.loads((out / "results.json").read_text())
    ranks = report["cells"][0]["ranks"].values()
    assert report["rank_multiple"] == 16 and all(k % 16 == 0 or k < 16 for k in ranks) and max(ranks) >= 16
    assert "- ranks: rounded to multiples of 16" in (out / "results.md").read_text()
    code, _, err = run_cli(capsys, *argv)  # the default, 8, is another setting
    assert code == 2 and "holds results of other settings" in err
    del report["rank_multiple"]  # a file written before the option existed held exact ranks
    (out / "results.json").write_text(json.dumps(report))
    code, printed, err = run_cli(capsys, *argv, "--rank-multiple", 1)
    assert code == 0 and "resuming: 1 finished cells" in printed, err


def test_bench_without_perplexity_measures_generation_only(capsys, tmp_path, tiny_folder, data_dir):
    out = tmp_path / "bench"
    argv = _grid(tiny_folder, data_dir, out, "--methods", "svd-llm", "--ratios", 0.4, "--no-speed")
    assert run_cli(capsys, *argv, "--no-perplexity")[0] == 0
    report = json.loads((out / "results.json").read_text())
    assert report["perplexity"] is False
    for c in (report["dense"], *report["cells"]):
        assert not {"wikitext2", "ptb", "pydoc"} & set(c)
        assert 0 <= c["repeated_3grams"] <= 1 and 0 < c["distinct_2"] <= 1 and c["params"] > 0
    assert report["cells"][0]["params"] < report["dense"]["params"]
    assert not (out / "plots" / "ppl_vs_ratio.png").exists()
    code, _, err = run_cli(capsys, *argv)  # a run with perplexity is another setting: it never resumes here
    assert code == 2 and "holds results of other settings" in err


def test_a_healed_cell_records_its_healers_options(capsys, tmp_path, tiny_folder, data_dir):
    out = tmp_path / "bench"
    argv = _grid(tiny_folder, data_dir, out, "--methods", "svd-llm+heal:kd", "--ratios", 0.4, "--no-speed")
    assert run_cli(capsys, *argv, "--no-plots", "--no-perplexity")[0] == 0
    cell = json.loads((out / "results.json").read_text())["cells"][0]
    assert cell["heal"] == "kd" and cell["healing_s"] > 0 and cell["healing"]["kd"]["steps"] >= 1
    assert cell["heal_config"]["kd"]["lr"] == 1e-4 and cell["heal_config"]["kd"]["seqlen"] == 512
    assert "heal_options" not in cell
    # options in the cell: another cell (the first is kept, not re-run), the options recorded and applied
    argv[argv.index("svd-llm+heal:kd")] = "svd-llm+heal:kd:kd.max_steps=1,kd.lr=3e-4"
    assert run_cli(capsys, *argv, "--no-plots", "--no-perplexity")[0] == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert len(cells) == 2 and cell in cells
    second = next(c for c in cells if c != cell)
    assert second["heal_options"] == {"kd.max_steps": 1, "kd.lr": 3e-4}
    assert second["heal_config"]["kd"]["lr"] == 3e-4 and second["healing"]["kd"]["steps"] == 1
    assert "svd-llm+heal:kd:kd.lr=0.0003,kd.max_steps=1" in (out / "results.md").read_text()
    argv[argv.index("svd-llm+heal:kd:kd.max_steps=1,kd.lr=3e-4")] = "svd-llm+heal:kd:block.lr=1"
    code, _, err = run_cli(capsys, *argv, "--no-plots", "--no-perplexity")
    assert code == 2 and "healing 'block', which this run does not do" in err


def test_bench_scorecard_zero_shot_and_generality(capsys, tmp_path, tiny_folder, data_dir, monkeypatch):
    """--zero-shot N scores the five tasks on their first N documents for dense and every cell (the local
    files under --data-dir/zeroshot), each cell gets its generality, and results.md the scorecard table."""
    pytest.importorskip("lm_eval")
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "zeroshot" / "boolq" / "val.jsonl").is_file():
        pytest.skip(f"zero-shot data not found at {SHARED_DATA}")
    (data_dir / "zeroshot").symlink_to(SHARED_DATA / "zeroshot")
    monkeypatch.setenv("SVDKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "bench"
    argv = _grid(tiny_folder, data_dir, out, "--methods", "svd", "--ratios", 0.3, "--zero-shot", 2)
    code, _, err = run_cli(capsys, *argv, "--no-speed", "--no-plots")
    assert code == 0, err
    report = json.loads((out / "results.json").read_text())
    assert report["zero_shot_limit"] == 2
    dense, (cell,) = report["dense"], report["cells"]
    for c in (dense, cell):
        tasks = c["zero_shot"]["tasks"]
        assert set(tasks) == {"arc_easy", "piqa", "hellaswag", "winogrande", "boolq"}
        assert all(t["samples"] == 2 for t in tasks.values())
    ratios = [cell[d] / dense[d] for d in ("wikitext2", "ptb", "pydoc")]
    assert cell["generality"] == pytest.approx((ratios[0] * ratios[1] * ratios[2]) ** (1 / 3))
    md = (out / "results.md").read_text()
    assert "## Scorecard" in md and "hellaswag acc_norm" in md
    code, _, err = run_cli(capsys, *argv[:-2], "--zero-shot", 3, "--no-speed", "--no-plots")  # another setting
    assert code == 2 and "other settings" in err
