"""`svdkit eval --tasks`: zero-shot accuracy through lm-evaluation-harness on a local task (conftest's
write_task), and the options only zero-shot evaluation takes."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

from conftest import TASK, tiny_model, write_task  # noqa: E402

import svdkit  # noqa: E402
from svdkit.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("offline_one_thread")


def test_cli_eval_with_tasks(capsys, tmp_path, tiny_folder, tiny_tokenizer):
    acc, _ = write_task(tmp_path / "tasks", tiny_model(), tiny_tokenizer)  # the folder holds tiny_model()
    argv = ["eval", tiny_folder, "--tasks", f"{TASK},", "--task-dir", tmp_path / "tasks", "--device", "cpu"]
    code = main([str(a) for a in [*argv, "--batch-size", "2", "--json"]])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["tasks"][TASK]["acc"] == pytest.approx(acc) and summary["num_fewshot"] == 0
    assert summary["params"] == svdkit.count_parameters(tiny_model())
    row = next(line for line in out.splitlines() if line.startswith(TASK) and " acc " in line)
    assert "0.7500 ± 0.1637" in row and row.split()[-1] == "8"

    code = main(["eval", str(tiny_folder), "--limit", "3", "--num-fewshot", "0"])  # perplexity options only
    _, err = capsys.readouterr()
    assert code == 2 and "--limit, --num-fewshot: only for zero-shot evaluation, which needs --tasks" in err


def test_cli_eval_beyond_the_context_is_one_line(capsys, tiny_folder, text_file):
    code = main(["eval", str(tiny_folder), "--dataset", str(text_file), "--seqlen", "257", "--device", "cpu"])
    _, err = capsys.readouterr()
    assert code == 2 and err.strip().splitlines()[-1] == (
        "svdkit: error: evaluation windows of 257 tokens are longer than the model's context of 256 tokens "
        "(max_position_embeddings): pass --seqlen / seqlen of at most 256"
    )
