"""Perplexity: exp of the mean next-token NLL over every predicted token; nothing silently dropped."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_tokens, tiny_model

import svdkit


def test_perplexity_matches_the_models_own_loss():
    model = tiny_model()
    ids = random_tokens(4 * 50 + 7)
    r = svdkit.perplexity(model, None, ids, seqlen=50, progress=False)
    assert (r.windows, r.tokens) == (4, 4 * 49)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in ids[:200].reshape(4, 50)]
    assert r.ppl == pytest.approx(math.exp(sum(losses) / 4), rel=1e-5)
    assert r.params == svdkit.count_parameters(model)
    assert svdkit.perplexity(model, None, ids, seqlen=50, max_windows=1, offset=50, progress=False).ppl == (
        pytest.approx(math.exp(losses[1]), rel=1e-5)
    )


def test_text_sources_work_with_a_tokenizer(tiny_tokenizer, text_file):
    model = tiny_model()
    r = svdkit.perplexity(model, tiny_tokenizer, text_file, seqlen=64, max_windows=3, progress=False)
    assert r.windows == 3 and math.isfinite(r.ppl) and r.ppl > 1


def test_a_non_finite_window_is_reported_not_skipped():
    model = tiny_model("llama-bias")  # untied: a NaN embedding row does not poison every logit
    ids = random_tokens(3 * 40)
    nan_at = int(ids[45])  # a token of window 1 only gets a NaN embedding
    assert nan_at not in ids[:40].tolist()
    with torch.no_grad():
        model.get_input_embeddings().weight[nan_at] = float("nan")
    with pytest.warns(UserWarning, match=r"non-finite loss in evaluation window\(s\) \[1"):
        r = svdkit.perplexity(model, None, ids, seqlen=40, progress=False)
    assert r.windows == 3 and 1 in r.nonfinite_windows and 0 not in r.nonfinite_windows
    assert not math.isfinite(r.ppl)


def test_windows_beyond_the_context_or_of_no_length_are_refused_before_the_text_is_read():
    model = tiny_model()  # max_position_embeddings 256
    with pytest.raises(
        svdkit.SvdkitError,
        match="^evaluation windows of 257 tokens are longer than the model's "
        r"context of 256 tokens \(max_position_embeddings\): pass --seqlen / seqlen of at most 256$",
    ):
        svdkit.perplexity(model, None, "no-such-text.txt", seqlen=257, progress=False)
    for bad in (1, 64.0, "64", True):
        with pytest.raises(svdkit.SvdkitError, match=f"^seqlen must be an integer >= 2, got {bad!r}$"):
            svdkit.perplexity(model, None, random_tokens(600), seqlen=bad, progress=False)
    assert svdkit.perplexity(model, None, random_tokens(600), seqlen=256, progress=False).windows == 2
