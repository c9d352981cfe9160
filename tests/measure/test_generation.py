"""The generation check: repetition scores on known sequences, greedy continuations of a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import last_json, random_tokens, run_cli, tiny_model

from svdkit.errors import SvdkitError
from svdkit.measure.generation import distinct_n, generation_quality, repeated_ngrams


def test_repetition_scores_of_known_sequences():
    assert repeated_ngrams([1, 2, 3, 4, 5]) == 0.0
    assert repeated_ngrams([7] * 10) == pytest.approx(1 - 1 / 8)  # 8 trigrams, one distinct
    assert repeated_ngrams([1, 2, 3, 1, 2, 3]) == pytest.approx(1 - 3 / 4)  # (1,2,3) again
    assert repeated_ngrams([1, 2]) == 0.0
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)  # (1,2) twice, (2,3), (2,4)


def test_greedy_continuations_of_a_tiny_model_are_deterministic_and_fixed_length():
    model = tiny_model()
    ids = random_tokens(4000, seed=2)
    a = generation_quality(model, ids, prompts=4, prompt_len=16, new_tokens=12)
    b = generation_quality(model, ids, prompts=4, prompt_len=16, new_tokens=12)
    assert a.continuations == b.continuations and [len(c) for c in a.continuations] == [12] * 4
    assert a.repeated_3grams == pytest.approx(sum(repeated_ngrams(c) for c in a.continuations) / 4)
    assert a.distinct_2 == distinct_n(a.continuations)
    with torch.no_grad():  # the first new token is the greedy choice after the first prompt
        first = model(input_ids=ids[None, :16]).logits[0, -1].argmax()
    assert a.continuations[0][0] == int(first)
    with pytest.raises(SvdkitError, match="only 10"):
        generation_quality(model, ids[:10], prompts=4, prompt_len=16)


def test_eval_generation_flag(capsys, tiny_folder, text_file):
    argv = ["eval", tiny_folder, "--dataset", text_file, "--seqlen", "32", "--max-windows", "2", "--generation"]
    code, out, err = run_cli(capsys, *argv, "--device", "cpu", "--json")
    assert code == 0, err
    g = last_json(out)["generation"]
    assert "of 3-grams repeated, distinct-2" in out and g["prompts"] == 16 and 0 <= g["repeated_3grams"] <= 1
