"""`svdkit compress`: the compress / eval / info / densify round trip, allocations, and its error paths
(exit 2, one line, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_error, last_json, run_cli

from svdkit.cli import main
from svdkit.methods.soco.scored import ScoredLinear


def test_compress_eval_info_densify(capsys, tmp_path, tiny_folder, text_file):
    out = tmp_path / "small"
    code, stdout, _ = run_cli(
        capsys,
        "compress",
        tiny_folder,
        "--method",
        "svd-llm",
        "--ratio",
        "0.4",
        "--calib",
        text_file,
        "--calib-samples",
        "3",
        "--calib-seqlen",
        "32",
        "--device",
        "cpu",
        "--output",
        out,
        "--rank-multiple",
        "1",
        "--json",
    )
    assert code == 0
    summary = last_json(stdout)
    assert summary["output"] == str(out) and summary["params"] < summary["params_dense"] and summary["seconds"] > 0
    assert summary["device"] == "cpu" and "peak_gpu_bytes" not in summary  # on CUDA: the GPU's name and its peak
    assert "parameters" in stdout and "kept dense" in stdout

    code, stdout, _ = run_cli(capsys, "info", out, "--json")
    info = last_json(stdout)
    assert code == 0 and info["method"] == "svd-llm" and info["ratio"] == 0.4
    assert info["params"] == summary["params"] and info["params_dense"] == summary["params_dense"]
    assert info["ranks"]["model.layers.0.self_attn.k_proj"] == 12  # floor(32 * 64 * 0.6 / 96)
    assert "rank 12" in stdout and info["allocation"]["rank_multiple"] == 1

    code, stdout, _ = run_cli(
        capsys, "eval", out, "--dataset", text_file, "--seqlen", "32", "--max-windows", "2", "--json"
    )
    result = last_json(stdout)
    assert code == 0 and result["windows"] == 2 and result["tokens"] == 62 and result["params"] == summary["params"]
    assert result["ppl"] > 1

    code, stdout, _ = run_cli(capsys, "densify", out, "--output", tmp_path / "dense")
    assert code == 0 and (tmp_path / "dense" / "model.safetensors").is_file()
    code, stdout, _ = run_cli(
        capsys, "eval", tmp_path / "dense", "--dataset", text_file, "--seqlen", "32", "--max-windows", "2", "--json"
    )
    assert last_json(stdout)["params"] == summary["params_dense"]
    assert last_json(stdout)["ppl"] == pytest.approx(result["ppl"], rel=1e-4)


def test_compress_with_sensitivity_allocation_reports_ranks(capsys, tmp_path, tiny_folder, text_file):
    out = tmp_path / "small"
    cache = tmp_path / "table.json"
    common = ["--calib", text_file, "--calib-samples", "3", "--calib-seqlen", "32", "--device", "cpu"]
    alloc = ["--allocation", "sensitivity", "--allocation-option", "windows=1", "--allocation-option", "seqlen=16"]
    alloc += ["--allocation-option", f"cache={cache}"]
    argv = ["compress", tiny_folder, "--method", "asvd", "--option", "alpha=1", "--ratio", "0.3", *common, *alloc]
    code, stdout, err = run_cli(capsys, *argv, "--output", out)
    assert code == 0, err
    assert "chosen ranks by module type" in stdout and "threshold_ppl" in stdout and cache.is_file()
    code, stdout, _ = run_cli(capsys, "info", out, "--json")
    info = last_json(stdout)
    assert info["allocation"]["name"] == "sensitivity" and info["allocation"]["config"]["windows"] == 1
    assert "allocation sensitivity" in stdout
    # a second run at another ratio reuses the table; a foreign table is reported and replaced
    code, _, err = run_cli(capsys, *argv, "--output", tmp_path / "again")
    assert code == 0 and "warning" not in err
    data = json.loads(cache.read_text())
    data["key"]["model_digest"] = "someone else's"
    cache.write_text(json.dumps(data))
    code, _, err = run_cli(capsys, *argv, "--output", tmp_path / "third")
    assert code == 0 and "svdkit: warning: ignoring sensitivity cache" in err and "model_digest" in err


@pytest.mark.parametrize("ratio", ["1", "1.5", "-0.2", "abc"])  # 0 (only with --kv-ratio): test_cli_generate
def test_ratio_outside_zero_one_exits_2(capsys, tmp_path, ratio):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "smollm2-135m", "--ratio", ratio, "--output", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("svdkit: error: svdkit compress: argument --ratio")


def test_non_empty_output_is_refused_and_kept(capsys, tmp_path, tiny_folder, text_file):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run_cli(
        capsys, "compress", tiny_folder, "--calib", text_file, "--calib-seqlen", "32", "--output", out
    )
    assert_error(code, err, "exists and is not empty: choose another or pass --overwrite")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    code, _, _ = run_cli(
        capsys,
        "compress",
        tiny_folder,
        "--calib",
        text_file,
        "--calib-samples",
        "2",
        "--calib-seqlen",
        "32",
        "--output",
        out,
        "--overwrite",
    )
    assert code == 0 and (out / "config.json").is_file() and not (out / "precious.txt").exists()


def test_nan_in_calibration_statistics_names_the_layer_and_writes_nothing(capsys, tmp_path, tiny_tokenizer, text_file):
    import torch
    from conftest import tiny_model

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.fill_(float("inf"))  # the MLP of layer 1 sees Inf/NaN
    folder = tmp_path / "broken"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    common = ["--calib", text_file, "--calib-samples", "2", "--calib-seqlen", "32", "--device", "cpu"]
    for extra in ([], ["--allocation", "v2"]):
        code, _, err = run_cli(capsys, "compress", folder, *common, *extra, "--output", tmp_path / "o")
        assert_error(code, err, "holds NaN or Inf")
        assert "model.layers.1.mlp" in err
        assert not (tmp_path / "o").exists()


def test_unknown_update_exits_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "smollm2-135m", "--update", "ridge", "--output", str(tmp_path / "o")])
    assert exc.value.code == 2 and "invalid choice: 'ridge'" in capsys.readouterr().err


def test_cli_rank_multiple_zero_exits_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "smollm2-135m", "--rank-multiple", "0", "--output", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "--rank-multiple: expected a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_soco_divergence_writes_nothing(tmp_path, tiny_folder, monkeypatch, capsys):
    monkeypatch.setattr(ScoredLinear, "forward", lambda self, x: torch.full_like(self.low(x), float("nan")))
    out = tmp_path / "out"
    code = main(
        [
            "compress",
            str(tiny_folder),
            "--method",
            "soco",
            "--ratio",
            "0.4",
            "--calib",
            "demo",
            "--calib-samples",
            "2",
            "--calib-seqlen",
            "64",
            "--option",
            "steps=3",
            "--output",
            str(out),
        ]
    )
    assert code == 2
    assert "diverged at step 1" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_a_calibration_mixture_is_recorded_and_info_shows_it(capsys, tmp_path, tiny_folder, text_file):
    out = tmp_path / "small"
    spec = f"{text_file}:2,{text_file}[200:]:1"
    argv = ["compress", tiny_folder, "--calib", spec, "--calib-seqlen", 32, "--device", "cpu", "--output", out]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    record = json.loads((out / "config.json").read_text())["svdkit"]["calibration"]
    assert record["source"] == spec and record["samples"] == 3
    assert record["parts"] == [
        {"source": str(text_file), "windows": 2, "start": 0, "end": None},
        {"source": str(text_file), "windows": 1, "start": 200, "end": None},
    ]
    code, stdout, _ = run_cli(capsys, "info", out, "--json")
    assert code == 0 and last_json(stdout)["calibration"]["parts"] == record["parts"]
    assert f"calibration: {spec}, 3 windows of 32 tokens, seed 0" in stdout
    assert f"{text_file}: 2 windows from tokens [0:]; {text_file}: 1 windows from tokens [200:]" in stdout


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("nosuch:4", "text source 'nosuch' is neither a file nor one of: wikitext2, ptb, c4, demo, self"),
        ("demo:0", "N (its window count) must be a positive integer, got '0'"),
        ("demo:4,ptb", "each gives its window count as SOURCE:N; 'ptb' lack(s) one"),
        ("self[0:9]:2", "'self' is written by the model and takes no [START:END] slice"),
        ("demo:4,,ptb:2", "has an empty part"),
    ],
)
def test_bad_calibration_specs_exit_2_before_any_model_loads(capsys, tmp_path, spec, fragment):
    argv = ["compress", tmp_path / "no-such-model", "--calib", spec, "--output", tmp_path / "o"]
    code, _, err = run_cli(capsys, *argv)
    assert_error(code, err, fragment)  # the spec's error, not the missing model's
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli(capsys, *argv[:3], "demo:4,ptb:4", "--calib-samples", 5, *argv[4:])
    assert_error(code, err, "samples is 5, but the spec 'demo:4,ptb:4' gives 8 windows in all")


def test_resume_of_a_finished_run_says_it_is_complete(capsys, tmp_path, tiny_folder):
    argv = ["compress", tiny_folder, "--calib-samples", 2, "--calib-seqlen", 32, "--output", tmp_path / "out"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    code, _, err = run_cli(capsys, *argv, "--resume")
    assert_error(code, err, f"--resume: {tmp_path / 'out'} is complete already")
