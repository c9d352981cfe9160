"""Zero-shot accuracy through lm-evaluation-harness, on a local multiple-choice task written here.

The gold answers are set from the model's own log-likelihoods (its best choice, or its worst on some
documents), so lm-eval's accuracy must equal a known fraction: this checks that lm-eval scores the
in-memory model itself (also a low-rank one) the way we do.
"""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("lm_eval")

import torch  # noqa: E402
from conftest import tiny_model  # noqa: E402

import svdkit  # noqa: E402
from svdkit import SvdkitError  # noqa: E402
from svdkit.cli import main  # noqa: E402
from svdkit.measure.zeroshot import zero_shot  # noqa: E402

TASK = "svdkit_tiny_mc"
DOCS = [
    ("The quick brown fox", ["jumps over", "sleeps", "judges my vow"]),
    ("Pack my box with", ["five dozen liquor jugs", "quartz", "a lazy dog"]),
    ("How vexingly quick", ["daft zebras jump", "the box", "black"]),
    ("Sphinx of black quartz,", ["judge my vow", "pack my box", "jump"]),
    ("The lazy dog", ["sleeps", "jumps over the fox", "is quick"]),
    ("Five dozen", ["liquor jugs", "zebras", "brown foxes jump"]),
    ("Daft zebras", ["jump", "judge the sphinx", "pack boxes"]),
    ("Judge my", ["vow", "quartz sphinx", "lazy brown dog"]),
]
WRONG = {1, 5}
"""documents whose gold answer is the model's worst choice: accuracy 6/8, and 3/4 on the first four"""


@pytest.fixture(autouse=True)
def offline_one_thread(monkeypatch):
    """Nothing may download; one thread runs a tiny model fastest (no OpenMP waits on a busy machine)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def choice_scores(model, tok, context: str, choices: list[str]) -> list[float]:
    """Summed log-likelihood of ' choice' after `context`, tokenized as lm-eval does: the whole text is
    encoded and the continuation is what follows the context's tokens."""
    n_context = len(tok.encode(context))
    scores = []
    for choice in choices:
        ids = torch.tensor(tok.encode(context + " " + choice))
        logp = model(input_ids=ids[None]).logits[0].double().log_softmax(-1)
        scores.append(float(sum(logp[i - 1, ids[i]] for i in range(n_context, len(ids)))))
    return scores


def write_task(folder, model, tok) -> tuple[float, float]:
    """The task YAML and its data; returns the expected (acc, acc_norm) over all documents."""
    folder.mkdir(exist_ok=True)
    rows, norm_hits = [], 0
    for i, (question, choices) in enumerate(DOCS):
        s = choice_scores(model, tok, question, choices)
        ranked = sorted(s, reverse=True)
        assert ranked[0] - ranked[1] > 1e-3, "choices too close to call"
        gold = s.index(min(s) if i in WRONG else max(s))
        norm = [v / len(c) for v, c in zip(s, choices, strict=True)]  # lm-eval's acc_norm: per character
        norm_hits += norm.index(max(norm)) == gold
        rows.append({"question": question, "choices": choices, "label": gold})
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_mc.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data))}\n"
        f"  cache_dir: {json.dumps(str(folder / 'hf-cache'))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return 1 - len(WRONG) / len(DOCS), norm_hits / len(DOCS)


def test_accuracy_equals_our_own_scoring(tmp_path, tiny_tokenizer):
    model = tiny_model()
    acc, acc_norm = write_task(tmp_path / "tasks", model, tiny_tokenizer)
    r = zero_shot(model, tiny_tokenizer, [TASK], task_dirs=[tmp_path / "tasks"], batch_size=3, progress=False)
    m = r[TASK]
    assert 0 <= m["acc"] <= 1 and m["acc"] == pytest.approx(acc) == 0.75
    assert m["acc_norm"] == pytest.approx(acc_norm)
    assert m["acc_stderr"] == pytest.approx((0.75 * 0.25 / 7) ** 0.5)  # sample stderr of a mean of 8
    assert m["samples"] == len(DOCS)
    assert tiny_tokenizer.pad_token is None  # lm-eval set a pad token on a copy, not on ours


def test_a_compressed_model_is_scored_as_it_is_in_memory(tmp_path, tiny_tokenizer):
    model = tiny_model()
    svdkit.compress(model, tiny_tokenizer, method="svd", ratio=0.4, device="cpu", progress=False)
    low_rank = [n for n, mod in model.named_modules() if isinstance(mod, svdkit.LowRankLinear)]
    assert low_rank
    write_task(tmp_path / "tasks", model, tiny_tokenizer)  # gold answers from the compressed model
    model.train()
    r = zero_shot(model, tiny_tokenizer, [TASK], task_dirs=[tmp_path / "tasks"], limit=4, progress=False)
    assert r[TASK]["samples"] == 4 and r[TASK]["acc"] == pytest.approx(0.75)
    assert model.training  # restored
    assert [n for n, mod in model.named_modules() if isinstance(mod, svdkit.LowRankLinear)] == low_rank


def test_unknown_task_and_bad_arguments_are_svdkit_errors(tmp_path, tiny_tokenizer):
    model = tiny_model()
    with pytest.raises(SvdkitError, match="unknown zero-shot task 'no_such_task_xyz'"):
        zero_shot(model, tiny_tokenizer, ["no_such_task_xyz"], progress=False)
    with pytest.raises(SvdkitError, match="task folder .* does not exist"):
        zero_shot(model, tiny_tokenizer, [TASK], task_dirs=[tmp_path / "missing"], progress=False)
    with pytest.raises(SvdkitError, match="no zero-shot task"):
        zero_shot(model, tiny_tokenizer, [" "], progress=False)
    with pytest.raises(SvdkitError, match="limit must be a positive integer"):
        zero_shot(model, tiny_tokenizer, [TASK], limit=0, progress=False)


def test_missing_lm_eval_says_how_to_install(monkeypatch, tiny_tokenizer):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(SvdkitError, match=r"pip install 'svdkit\[zeroshot\]'"):
        zero_shot(tiny_model(), tiny_tokenizer, [TASK])


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
