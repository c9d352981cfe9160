"""The command line: the compress / eval / info / densify contract and its error paths (exit 2, one line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from svdkit.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def assert_error(code, err, fragment):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("svdkit: error: ") and fragment in lines[-1], err
    assert sum("error" in line for line in lines) == 1


def test_compress_eval_info_densify(capsys, tmp_path, tiny_folder, text_file):
    out = tmp_path / "small"
    code, stdout, _ = run(
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
    assert "parameters" in stdout and "kept dense" in stdout

    code, stdout, _ = run(capsys, "info", out, "--json")
    info = last_json(stdout)
    assert code == 0 and info["method"] == "svd-llm" and info["ratio"] == 0.4
    assert info["params"] == summary["params"] and info["params_dense"] == summary["params_dense"]
    assert info["ranks"]["model.layers.0.self_attn.k_proj"] == 12  # floor(32 * 64 * 0.6 / 96)
    assert "rank 12" in stdout and info["allocation"]["rank_multiple"] == 1

    code, stdout, _ = run(capsys, "eval", out, "--dataset", text_file, "--seqlen", "32", "--max-windows", "2", "--json")
    result = last_json(stdout)
    assert code == 0 and result["windows"] == 2 and result["tokens"] == 62 and result["params"] == summary["params"]
    assert result["ppl"] > 1

    code, stdout, _ = run(capsys, "densify", out, "--output", tmp_path / "dense")
    assert code == 0 and (tmp_path / "dense" / "model.safetensors").is_file()
    code, stdout, _ = run(
        capsys, "eval", tmp_path / "dense", "--dataset", text_file, "--seqlen", "32", "--max-windows", "2", "--json"
    )
    assert last_json(stdout)["params"] == summary["params_dense"]
    assert last_json(stdout)["ppl"] == pytest.approx(result["ppl"], rel=1e-4)


def test_methods_are_listed(capsys):
    code, stdout, _ = run(capsys, "methods")
    assert code == 0 and "svd-llm" in stdout and "svd " in stdout
    assert "alpha=0.5" in stdout and "k1_fraction=0.95" in stdout and "sensitivity" in stdout


def test_compress_with_sensitivity_allocation_reports_ranks(capsys, tmp_path, tiny_folder, text_file):
    out = tmp_path / "small"
    cache = tmp_path / "table.json"
    common = ["--calib", text_file, "--calib-samples", "3", "--calib-seqlen", "32", "--device", "cpu"]
    alloc = ["--allocation", "sensitivity", "--allocation-option", "windows=1", "--allocation-option", "seqlen=16"]
    alloc += ["--allocation-option", f"cache={cache}"]
    argv = ["compress", tiny_folder, "--method", "asvd", "--option", "alpha=1", "--ratio", "0.3", *common, *alloc]
    code, stdout, err = run(capsys, *argv, "--output", out)
    assert code == 0, err
    assert "chosen ranks by module type" in stdout and "threshold_ppl" in stdout and cache.is_file()
    code, stdout, _ = run(capsys, "info", out, "--json")
    info = last_json(stdout)
    assert info["allocation"]["name"] == "sensitivity" and info["allocation"]["config"]["windows"] == 1
    assert "allocation sensitivity" in stdout
    # a second run at another ratio reuses the table; a foreign table is reported and replaced
    code, _, err = run(capsys, *argv, "--output", tmp_path / "again")
    assert code == 0 and "warning" not in err
    data = json.loads(cache.read_text())
    data["key"]["model_digest"] = "someone else's"
    cache.write_text(json.dumps(data))
    code, _, err = run(capsys, *argv, "--output", tmp_path / "third")
    assert code == 0 and "svdkit: warning: ignoring sensitivity cache" in err and "model_digest" in err


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["compress", "/no/such/model", "--output", "{tmp}/o"], "model path '/no/such/model' does not exist"),
        (["compress", "{tmp}", "--output", "{tmp}/o"], "is a folder but not a model: it has no config.json"),
        (
            ["compress", "{model}", "--method", "magic", "--output", "{tmp}/o"],
            "known methods: asvd, fwsvd, nsvd, nsvd2, soco, svd, svd-llm, svd-llm-v2",
        ),
        (["compress", "{model}", "--option", "nope=1", "--output", "{tmp}/o"], "has no option nope"),
        (
            ["compress", "{model}", "--calib", "{text}", "--calib-seqlen", "99999", "--output", "{tmp}/o"],
            "too short for one window of 99999",
        ),
        (["compress", "{model}", "--calib", "{tmp}/nothing.txt", "--output", "{tmp}/o"], "neither a file nor"),
        (["compress", "{gpt2}", "--output", "{tmp}/o"], "unsupported architecture GPT2LMHeadModel: expected"),
        (["compress", "{model}", "--method", "asvd", "--option", "alpha=3", "--output", "{tmp}/o"], "alpha must be"),
        (["compress", "{model}", "--method", "nsvd", "--option", "k1_fraction=0", "--output", "{tmp}/o"], "(0, 1]"),
        (["compress", "{model}", "--allocation", "greedy", "--output", "{tmp}/o"], "unknown allocation 'greedy'"),
        (
            [
                "compress",
                "{model}",
                "--allocation",
                "sensitivity",
                "--allocation-option",
                "grid=[2]",
                "--output",
                "{tmp}/o",
            ],
            "grid must be kept fractions strictly between 0 and 1",
        ),
        (["eval", "./missing-model", "--dataset", "demo"], "does not exist"),
        (["info", "{model}"], "is not an svdkit-compressed model folder"),
        (["densify", "{model}", "--output", "{tmp}/o"], "is not an svdkit-compressed model folder"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(
    capsys, tmp_path, tiny_folder, text_file, tiny_tokenizer, argv, fragment
):
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=320, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(gpt2)
    tiny_tokenizer.save_pretrained(gpt2)
    subs = {"{tmp}": str(tmp_path), "{model}": str(tiny_folder), "{text}": str(text_file), "{gpt2}": str(gpt2)}
    args = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, v)
        args.append(a)
    code, _, err = run(capsys, *args)
    assert_error(code, err, fragment)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("ratio", ["1", "1.5", "-0.2", "abc"])  # 0 (only with --kv-ratio): test_kvcache
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
    code, _, err = run(capsys, "compress", tiny_folder, "--calib", text_file, "--calib-seqlen", "32", "--output", out)
    assert_error(code, err, "exists and is not empty: choose another or pass --overwrite")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    code, _, _ = run(
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


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "svdkit.cli", "info", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("svdkit: error: ")


def test_hub_id_offline_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "svdkit.cli", "eval", "someorg/somemodel", "--dataset", "demo"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("svdkit: error: could not load 'someorg/somemodel'")
    assert "hub" in lines[0]


def test_demo_refuses_to_replace_a_foreign_folder(tmp_path):
    from svdkit import SvdkitError
    from svdkit.cli.demo import run_demo

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not a model")
    with pytest.raises(SvdkitError, match="exists and is not empty"):
        run_demo(output=str(out))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_compress_with_v2_allocation_update_and_a_rank_map_plot(capsys, tmp_path, tiny_folder, text_file):
    out = tmp_path / "small"
    common = ["--calib", text_file, "--calib-samples", "3", "--calib-seqlen", "32", "--device", "cpu"]
    argv = ["compress", tiny_folder, "--method", "svd-llm-v2", "--ratio", "0.4", "--allocation", "v2", *common]
    argv += ["--update", "lstsq", "--statistics-dir", tmp_path / "spill", "--output", out]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert "chosen ranks by module type" in stdout and "ratio_range" in stdout
    assert list((tmp_path / "spill").iterdir()) == []
    png = tmp_path / "map.png"
    code, stdout, err = run(capsys, "info", out, "--plot", png, "--json")
    assert code == 0, err
    info = last_json(stdout)
    assert info["allocation"]["name"] == "v2" and info["update"] == "lstsq"
    assert "parameter update: lstsq" in stdout and "keeps" in stdout and f"rank map written to {png}" in stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    code, _, err = run(capsys, "info", out, "--plot", tmp_path / "map.txt")
    assert_error(code, err, "ending in .png")
    code, _, err = run(capsys, "info", out, "--plot", tmp_path / "no" / "map.png")
    assert_error(code, err, "does not exist")


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
        code, _, err = run(capsys, "compress", folder, *common, *extra, "--output", tmp_path / "o")
        assert_error(code, err, "holds NaN or Inf")
        assert "model.layers.1.mlp" in err
        assert not (tmp_path / "o").exists()


def test_unknown_update_exits_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "smollm2-135m", "--update", "ridge", "--output", str(tmp_path / "o")])
    assert exc.value.code == 2 and "invalid choice: 'ridge'" in capsys.readouterr().err
