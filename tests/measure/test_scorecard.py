"""The scorecard (svdkit.measure.scorecard): three domains, the five zero-shot tasks, generation, dense beside,
and generality as the geometric mean of the perplexity ratios; `svdkit eval --scorecard` prints and caches it."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("lm_eval")

from conftest import SHARED_DATA, tiny_model  # noqa: E402

import svdkit  # noqa: E402
from svdkit import SvdkitError  # noqa: E402
from svdkit.cli import main  # noqa: E402
from svdkit.measure.perplexity import perplexity  # noqa: E402
from svdkit.measure.scorecard import (  # noqa: E402
    ScorecardSettings,
    compare,
    domain_tokens,
    format_scorecard,
    generality,
    scorecard,
    task_scores,
)

pytestmark = pytest.mark.usefixtures("offline_one_thread")

SMALL = ScorecardSettings(seqlen=64, windows={"wikitext2": 2, "ptb": 2, "pydoc": 2}, limit=2, batch_size=2)


@pytest.fixture()
def data(tmp_path, monkeypatch):
    if not (SHARED_DATA / "zeroshot" / "piqa" / "valid.jsonl").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set SVDKIT_TEST_DATA)")
    monkeypatch.setenv("SVDKIT_CACHE", str(tmp_path / "cache"))
    return SHARED_DATA


def test_generality_is_the_geometric_mean_of_the_ratios():
    dense = {"wikitext2": 20.0, "ptb": 40.0, "pydoc": 8.0}
    assert generality({"wikitext2": 40.0, "ptb": 40.0, "pydoc": 64.0}, dense) == pytest.approx((2 * 1 * 8) ** (1 / 3))
    with pytest.raises(SvdkitError, match="same domains"):
        generality({"other": 1.0}, dense)


def test_task_scores_take_acc_norm_where_reported_and_the_mean_stderr():
    r = task_scores(
        {
            "piqa": {"acc": 0.6, "acc_stderr": 0.03, "acc_norm": 0.7, "acc_norm_stderr": 0.04, "samples": 10},
            "boolq": {"acc": 0.5, "acc_stderr": 0.03, "samples": 10},
        }
    )
    assert r["tasks"]["piqa"]["metric"] == "acc_norm" and r["tasks"]["boolq"]["metric"] == "acc"
    assert r["mean"] == pytest.approx(0.6)
    assert r["mean_stderr"] == pytest.approx(math.sqrt(0.04**2 + 0.03**2) / 2)


def test_scorecard_of_a_compressed_model_beside_dense(data, tiny_tokenizer):
    dense_model = tiny_model()
    tokens = domain_tokens(tiny_tokenizer, data)
    assert set(tokens) == {"wikitext2", "ptb", "pydoc"}
    dense = scorecard(dense_model, tiny_tokenizer, SMALL, data_dir=data, tokens=tokens)
    model = tiny_model()
    svdkit.compress(model, tiny_tokenizer, method="svd", ratio=0.4, device="cpu", progress=False)
    card = compare(scorecard(model, tiny_tokenizer, SMALL, data_dir=data, tokens=tokens), dense)
    pydoc_tail = tokens["pydoc"][-2 * 64 :]  # the last windows of the Python docs
    assert card["ppl"]["pydoc"] == pytest.approx(perplexity(model, None, pydoc_tail, seqlen=64, progress=False).ppl)
    assert card["generality"] == pytest.approx(generality(card["ppl"], dense["ppl"]))
    assert set(card["zero_shot"]["tasks"]) == {"arc_easy", "piqa", "hellaswag", "winogrande", "boolq"}
    assert all(t["samples"] == 2 for t in card["zero_shot"]["tasks"].values())
    assert card["zero_shot_drop"] == pytest.approx(100 * (dense["zero_shot"]["mean"] - card["zero_shot"]["mean"]))
    table = format_scorecard(card)
    assert "perplexity pydoc" in table and "generality" in table and "hellaswag (acc_norm)" in table
    assert compare(dense, dense)["generality"] == pytest.approx(1.0)
    with pytest.raises(SvdkitError, match="other settings"):
        compare(card, {**dense, "settings": {}})


def test_cli_scorecard_with_dense_cached(data, capsys, tiny_folder, tiny_tokenizer, tmp_path):
    model = tiny_model()  # what tiny_folder holds
    svdkit.compress(model, tiny_tokenizer, method="svd", ratio=0.4, device="cpu", progress=False)
    svdkit.save(model, tiny_tokenizer, tmp_path / "low-rank")
    options = ["--data-dir", str(data), "--seqlen", "64", "--limit", "2", "--batch-size", "2", "--device", "cpu"]
    argv = ["eval", str(tmp_path / "low-rank"), "--scorecard", "--dense", str(tiny_folder), *options, "--json"]
    assert main(argv) == 0
    out, _ = capsys.readouterr()
    card = json.loads(out.strip().splitlines()[-1])
    assert card["generality"] == pytest.approx(generality(card["ppl"], card["dense"]["ppl"]))
    assert card["generality"] > 1
    assert card["params"] < card["dense"]["params"]
    assert "scorecard of" in out and "generality" in out and "vs dense" in out
    cached = {p: json.loads(p.read_text()) for p in (tmp_path / "cache" / "scorecards").glob("*.json")}
    assert len(cached) == 2  # the model's and dense's, keyed by their weights
    (dense_file,) = [p for p, c in cached.items() if c["ppl"] == card["dense"]["ppl"]]
    doubled = {**cached[dense_file], "ppl": {k: 2 * v for k, v in card["dense"]["ppl"].items()}}
    dense_file.write_text(json.dumps(doubled))
    assert main(argv) == 0  # both cards now come from the cache
    again = json.loads(capsys.readouterr()[0].strip().splitlines()[-1])
    assert again["ppl"] == card["ppl"] and again["generality"] == pytest.approx(card["generality"] / 2)

    assert main(["eval", str(tiny_folder), "--scorecard", "--tasks", "piqa"]) == 2
    assert "--tasks: not with --scorecard" in capsys.readouterr()[1]
    assert main(["eval", str(tiny_folder), "--dense", str(tiny_folder)]) == 2
    assert "--dense: only with --scorecard" in capsys.readouterr()[1]
