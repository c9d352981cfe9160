"""Calibration text the model writes itself (svdkit.sources.selftext, ``--calib self``): seeded and exact in
length, never a special token, greedy then sampled through the KV cache as LLM-QAT does, cached by the
model's fingerprint (a second call runs no model) and written atomically."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import VOCAB, tiny_model

import svdkit.sources.selftext as selftext
from svdkit.sources.mixture import mixture_windows
from svdkit.sources.selftext import GREEDY, allowed_tokens, generate_windows, self_windows


class Tokenizer:
    """What the generator reads of a tokenizer: its length and its special ids."""

    def __init__(self, special: list[int]) -> None:
        self.all_special_ids = special

    def __len__(self) -> int:
        return VOCAB


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "self-text"


def _count_forwards(model, monkeypatch) -> list[int]:
    calls = [0]
    forward = model.forward

    @functools.wraps(forward)  # the same signature: the cache goes in under the name the forward takes
    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counted)
    return calls


def test_windows_are_seeded_exactly_seqlen_long_and_independent_of_batching(monkeypatch):
    model, tok = tiny_model(), Tokenizer([])
    a = generate_windows(model, tok, 10, 24, seed=3)  # two batches: 8 + 2
    assert a.shape == (10, 24) and a.dtype == torch.long
    assert torch.equal(a, generate_windows(model, tok, 10, 24, seed=3))
    assert not torch.equal(a, generate_windows(model, tok, 10, 24, seed=4))
    monkeypatch.setattr(selftext, "BATCH", 3)
    assert torch.equal(a, generate_windows(model, tok, 10, 24, seed=3))  # window i depends on (seed, i) only


def test_no_special_token_is_ever_written():
    model, special = tiny_model(), list(range(12))
    free = generate_windows(model, Tokenizer([]), 8, 48, seed=0)
    assert any(t in special for t in free.unique().tolist())  # without the rule they do occur
    windows = generate_windows(model, Tokenizer(special), 8, 48, seed=0)
    assert not any(t in special for t in windows.unique().tolist())
    assert allowed_tokens(model, Tokenizer(special)).sum() == VOCAB - len(special)


def test_a_uniform_first_token_then_greedy_then_sampled_through_the_kv_cache():
    model, tok = tiny_model(), Tokenizer([0, 1])
    windows = generate_windows(model, tok, 4, 32, seed=1)
    with torch.no_grad():  # the whole windows at once, no cache: the greedy steps must be their argmax
        logits = model(input_ids=windows).logits.masked_fill(~allowed_tokens(model, tok), float("-inf"))
    top = logits.argmax(-1)
    assert torch.equal(windows[:, 1 : GREEDY + 1], top[:, :GREEDY])  # a cache used wrongly gives other tokens
    assert not torch.equal(windows[:, GREEDY + 1 :], top[:, GREEDY:-1])  # then sampled, not greedy
    assert len(set(windows[:, 0].tolist())) > 1  # first tokens drawn, not fixed


def test_the_text_is_cached_by_the_models_fingerprint(cache, monkeypatch):
    model, tok = tiny_model(), Tokenizer([0])
    calls = _count_forwards(model, monkeypatch)
    first = self_windows(model, tok, 3, 16, seed=2)
    assert calls[0] == 15 and len(list(cache.glob("*.safetensors"))) == 1  # one forward per generated token
    again = self_windows(model, tok, 3, 16, seed=2)
    assert calls[0] == 15 and torch.equal(first, again)  # read back: the model did not run
    self_windows(model, tok, 3, 16, seed=5)  # another seed is another text
    assert calls[0] == 30 and len(list(cache.glob("*.safetensors"))) == 2
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[3, 4] += 1.0  # another model
    self_windows(model, tok, 3, 16, seed=2)
    assert calls[0] == 45
    spec = mixture_windows("self:3", 3, 16, 0, 2, tok, model)  # the spec reads the same cache
    assert calls[0] == 45 and spec.shape == (3, 16)
    fewer = self_windows(model, tok, 2, 16, seed=2)  # the first windows of the cached set: no model run
    assert calls[0] == 45 and torch.equal(fewer, spec[:2])
    more = self_windows(model, tok, 5, 16, seed=2)  # more than cached: written anew, the same first ones
    assert calls[0] == 60 and torch.equal(more[:3], spec)  # one batch of 5: 15 forwards
    assert len(list(cache.glob("*.safetensors"))) == 3  # the larger set replaced the smaller one


def test_a_killed_write_leaves_no_cache_and_a_bad_cache_is_written_again(cache, monkeypatch):
    model, tok = tiny_model(), Tokenizer([])

    def killed(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(selftext, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        self_windows(model, tok, 2, 8, seed=0)
    assert not list(cache.glob("*.safetensors"))  # the final name is never half-written
    monkeypatch.undo()
    monkeypatch.setenv("SVDKIT_CACHE", str(cache.parent))
    windows = self_windows(model, tok, 2, 8, seed=0)
    (path,) = cache.glob("*.safetensors")
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="ignoring the self-text cache"):
        assert torch.equal(self_windows(model, tok, 2, 8, seed=0), windows)
    assert torch.equal(self_windows(model, tok, 2, 8, seed=0), windows)  # rewritten whole
