"""The protocol's five zero-shot tasks read offline (svdkit.measure.tasks): lm-eval scores the first documents
of each local file, and its accuracy equals our own scoring of lm-eval's prompt for that task on the raw
file, so the conversion (questions, choices, gold answers) and the prompts are lm-eval's."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("lm_eval")

from conftest import SHARED_DATA, choice_scores, tiny_config  # noqa: E402

from svdkit import SvdkitError  # noqa: E402
from svdkit.measure.tasks import LOCAL_TASKS, task_data_dir, write_local_tasks  # noqa: E402
from svdkit.measure.zeroshot import zero_shot  # noqa: E402

pytestmark = pytest.mark.usefixtures("offline_one_thread")

ZEROSHOT = SHARED_DATA / "zeroshot"
N = 3


@pytest.fixture()
def zeroshot_data(tmp_path, monkeypatch):
    if not (ZEROSHOT / "arc_easy" / "ARC-Easy-Test.jsonl").is_file():
        pytest.skip(f"zero-shot data not found at {ZEROSHOT} (set SVDKIT_TEST_DATA)")
    monkeypatch.setenv("SVDKIT_CACHE", str(tmp_path / "cache"))
    return ZEROSHOT


def _model():
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # a context long enough for BoolQ's passages in the tiny tokenizer's bytes
    return AutoModelForCausalLM.from_config(tiny_config(max_position_embeddings=4096)).eval()


def _lines(path, n=N):
    with open(path, encoding="utf-8") as f:
        return [line.strip() for _, line in zip(range(n), f, strict=False)]


def _docs(task: str) -> list[tuple[list[str], list[str], int]]:
    """(contexts, continuations, gold) of the first N documents, from the raw files and lm-eval's prompts."""
    folder = ZEROSHOT / task
    out = []
    if task == "arc_easy":
        for d in map(json.loads, _lines(folder / "ARC-Easy-Test.jsonl")):
            q = d["question"]
            labels = [c["label"] for c in q["choices"]]
            out.append(
                ([f"Question: {q['stem']}\nAnswer:"], [c["text"] for c in q["choices"]], labels.index(d["answerKey"]))
            )
    elif task == "piqa":
        labels = _lines(folder / "valid-labels.lst")
        for d, label in zip(map(json.loads, _lines(folder / "valid.jsonl")), labels, strict=True):
            out.append(([f"Question: {d['goal']}\nAnswer:"], [d["sol1"], d["sol2"]], int(label)))
    elif task == "hellaswag":
        for d in map(json.loads, _lines(folder / "hellaswag_val_lmeval.jsonl")):
            out.append(([d["query"]], d["choices"], int(d["gold"])))
    elif task == "winogrande":  # lm-eval's partial scoring: one context per option, one shared continuation
        for d in map(json.loads, _lines(folder / "dev.jsonl")):
            i = d["sentence"].index("_")
            contexts = [d["sentence"][:i] + d[k] for k in ("option1", "option2")]
            out.append((contexts, [d["sentence"][i + 1 :].strip()], int(d["answer"]) - 1))
    else:
        for d in map(json.loads, _lines(folder / "val.jsonl")):
            prompt = f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:"
            out.append(([prompt], ["no", "yes"], int(str(d["label"]).lower() == "true")))
    return out


def _our_accuracy(model, tok, task: str) -> float:
    hits = 0
    for contexts, continuations, gold in _docs(task):
        if len(contexts) > 1:
            scores = [choice_scores(model, tok, c, continuations)[0] for c in contexts]
        else:
            scores = choice_scores(model, tok, contexts[0], continuations)
        hits += scores.index(max(scores)) == gold
    return hits / N


@pytest.mark.parametrize("task", list(LOCAL_TASKS))
def test_local_task_scores_like_lm_eval_prompts(task, zeroshot_data, tiny_tokenizer):
    model = _model()
    r = zero_shot(model, tiny_tokenizer, [task], task_data=zeroshot_data, limit=N, batch_size=2, progress=False)[task]
    assert r["samples"] == N
    assert r["acc"] == pytest.approx(_our_accuracy(model, tiny_tokenizer, task))
    assert ("acc_norm" in r) == (task not in ("winogrande", "boolq"))  # lm-eval's metric lists
    assert r["acc_stderr"] is not None


def test_task_data_from_svdkit_data_and_cached(zeroshot_data, monkeypatch, tmp_path):
    monkeypatch.setenv("SVDKIT_DATA", str(zeroshot_data.parent))  # the data folder holding zeroshot/
    assert task_data_dir() == zeroshot_data
    folder = write_local_tasks(["piqa", "boolq"], zeroshot_data, tmp_path / "c")
    rows = [json.loads(line) for line in _lines(folder / "boolq.jsonl", 4)]
    truth = [
        str(json.loads(line)["label"]).lower() == "true" for line in _lines(zeroshot_data / "boolq" / "val.jsonl", 4)
    ]
    assert [r["label"] for r in rows] == [int(t) for t in truth]
    assert "include:" in (folder / "piqa.yaml").read_text()  # lm-eval's own definition, our data
    stamp = os.stat(folder / "piqa.jsonl").st_mtime_ns
    assert write_local_tasks(["piqa", "boolq"], zeroshot_data, tmp_path / "c") == folder
    assert os.stat(folder / "piqa.jsonl").st_mtime_ns == stamp  # made once
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".tmp")]


def test_bad_task_data_is_one_clear_error(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("SVDKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SvdkitError, match="task data folder .* does not exist"):
        task_data_dir(tmp_path / "nowhere")
    (tmp_path / "data" / "piqa").mkdir(parents=True)
    (tmp_path / "data" / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    (tmp_path / "data" / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(SvdkitError, match="piqa: 1 documents but 2 labels"):
        write_local_tasks(["piqa"], tmp_path / "data", tmp_path / "cache")
    with pytest.raises(SvdkitError, match="zero-shot task data is missing: .*ARC-Easy-Test.jsonl"):
        zero_shot(_model(), tiny_tokenizer, ["arc_easy"], task_data=tmp_path / "data", progress=False)
    with pytest.raises(SvdkitError, match="few-shot examples would come from the documents being scored"):
        zero_shot(_model(), tiny_tokenizer, ["piqa"], task_data=tmp_path / "data", num_fewshot=1, progress=False)
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # nothing half-written
