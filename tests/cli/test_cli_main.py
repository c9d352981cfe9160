"""The command line's entry point: bad input is one clear error line (exit 2) and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import assert_error, run_cli


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["compress", "/no/such/model", "--output", "{tmp}/o"], "model path '/no/such/model' does not exist"),
        (["compress", "{tmp}", "--output", "{tmp}/o"], "is a folder but not a model: it has no config.json"),
        (
            ["compress", "{model}", "--method", "magic", "--output", "{tmp}/o"],
            "known methods: asvd, fwsvd, nsvd, nsvd2, qlr, soco, svd, svd-llm, svd-llm-v2",
        ),
        (["compress", "{model}", "--option", "nope=1", "--output", "{tmp}/o"], "has no option nope"),
        (
            ["compress", "{model}", "--calib", "{text}", "--calib-seqlen", "99999", "--output", "{tmp}/o"],
            "longer than the model's context of 256 tokens",
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
    code, _, err = run_cli(capsys, *args)
    assert_error(code, err, fragment)
    assert not (tmp_path / "o").exists()


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
