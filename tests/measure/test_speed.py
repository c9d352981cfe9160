"""The speed and size measurements: weights and file size, decode and prefill, paired timing."""

from __future__ import annotations

import pytest
from conftest import random_tokens, tiny_model

from svdkit import LowRankLinear, compress
from svdkit.core.compat import cache_kwarg
from svdkit.measure.speed import decode_tokens_per_second, prefill_peak_mb, saved_size_mb, weights_mb


def test_weights_and_file_size_shrink_with_low_rank_layers():
    model = tiny_model()
    dense_w, dense_f = weights_mb(model), saved_size_mb(model)
    compress(model, None, method="svd", ratio=0.5, progress=False)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    assert weights_mb(model) < dense_w and saved_size_mb(model) < dense_f
    tensors = list(model.parameters()) + list(model.buffers())  # parameters() counts tied weights once
    assert weights_mb(model) == pytest.approx(sum(t.numel() * t.element_size() for t in tensors) / 2**20)


def test_decode_and_prefill_memory_are_measured():
    model = tiny_model()
    ids = random_tokens(64)
    assert decode_tokens_per_second(model, ids[:8], new_tokens=5, repeats=1) > 0
    peak = prefill_peak_mb(model, ids)
    assert peak is None or peak >= 0


def test_prefill_is_a_generation_prefill_and_forward_scores_every_position():
    from svdkit.measure import speed

    model = tiny_model()
    ids = random_tokens(64)
    seen = []
    hook = model.register_forward_hook(lambda mod, args, kwargs, out: seen.append((kwargs, out)), with_kwargs=True)
    assert speed.prefill_tokens_per_second(model, ids, repeats=1) > 0
    kwargs, out = seen[-1]
    assert out.logits.shape[1] == 1 and kwargs[cache_kwarg(model.forward)].get_seq_length() == 64  # cache filled
    seen.clear()
    assert speed.forward_tokens_per_second(model, ids, repeats=1) > 0
    assert seen[-1][1].logits.shape[1] == 64 and seen[-1][0]["use_cache"] is False
    hook.remove()


def test_paired_speed_times_the_models_in_alternation():
    from svdkit.measure.speed import paired_speed

    a, b = tiny_model(), tiny_model(seed=1)
    order: list[str] = []
    a.register_forward_hook(lambda *_: order.append("a"))
    b.register_forward_hook(lambda *_: order.append("b"))
    out = paired_speed({"a": a, "b": b}, random_tokens(32), new_tokens=0, repeats=2)
    assert set(out) == {"a", "b"} and all(v > 0 for d in out.values() for v in d.values())
    assert set(out["a"]) == {"prefill_tok_s", "forward_tok_s"}  # no decode asked for
    # warm-ups (prefill, forward) of each, then per round: prefill a, prefill b, forward a, forward b
    assert order == ["a", "a", "b", "b"] + ["a", "b", "a", "b"] * 2
