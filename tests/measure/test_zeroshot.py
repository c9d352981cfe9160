"""Zero-shot accuracy through lm-evaluation-harness, on a local multiple-choice task (conftest's
write_task).

The gold answers are set from the model's own log-likelihoods (its best choice, or its worst on some
documents), so lm-eval's accuracy must equal a known fraction: this checks that lm-eval scores the
in-memory model itself (also a low-rank one) the way we do.
"""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("lm_eval")

from conftest import DOCS, TASK, tiny_model, write_task  # noqa: E402

import svdkit  # noqa: E402
from svdkit import SvdkitError  # noqa: E402
from svdkit.measure.zeroshot import zero_shot  # noqa: E402

pytestmark = pytest.mark.usefixtures("offline_one_thread")


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
