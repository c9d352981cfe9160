"""The latent KV cache (ASVD): exact tokens against the ordinary cache, the k/v rank rule, compress()
with kv_ratio, the errors."""

from __future__ import annotations

import io

import pytest
import torch
import transformers
from conftest import random_tokens, tiny_config, tiny_model
from transformers import DynamicCache

import svdkit
from svdkit.core.compat import cache_kwargs, output_cache
from svdkit.core.lowrank import LowRankLinear
from svdkit.saved.kvcache import (
    disable_latent_kv_cache,
    enable_latent_kv_cache,
    kv_bytes_per_token,
    kv_rank,
    kv_ranks,
    latent_kv_enabled,
)

GREEDY = dict(do_sample=False, pad_token_id=0)


def low_rank_kv(model, rank: int = 12):
    """Truncated SVD of every k_proj / v_proj (biases kept): the shape a compressed model has."""
    for layer in model.model.layers:
        for name in ("k_proj", "v_proj"):
            lin = layer.self_attn.get_submodule(name)
            U, S, Vh = torch.linalg.svd(lin.weight.detach())
            bias = lin.bias.detach() if lin.bias is not None else None
            layer.self_attn.set_submodule(
                name, LowRankLinear.from_factors(S[:rank, None] * Vh[:rank], U[:, :rank], bias)
            )
    return model


def latent_width(proj) -> int:
    """What the latent cache keeps per token for one projection: its rank, or its whole output when dense."""
    return proj.rank if isinstance(proj, LowRankLinear) else proj.out_features


def check_cache(model, cache, length: int) -> None:
    """The cache really served generation: `length` tokens in every layer, as latents (batch, 1, L, r) of
    each layer's k_proj rank when the latent path is on, as keys (batch, kv heads, L, head_dim) when not."""
    assert cache.get_seq_length() == length > 0
    for layer, attention in zip(cache.layers, (decoder.self_attn for decoder in model.model.layers), strict=True):
        if latent_kv_enabled(model):
            assert layer.keys.shape[1:] == (1, length, latent_width(attention.k_proj))
            assert layer.values.shape[1:] == (1, length, latent_width(attention.v_proj))
        else:
            assert layer.keys.shape[1:] == (model.config.num_key_value_heads, length, attention.head_dim)


def generate(model, ids, cache=None, **kw):
    """Greedy generation through `cache` (a fresh DynamicCache by default), checked by :func:`check_cache`."""
    cache = DynamicCache(config=model.config) if cache is None else cache
    with torch.no_grad():
        out = model.generate(ids, **{**GREEDY, **kw}, **cache_kwargs(model, cache))
    if kw.get("num_beams", 1) == 1:
        check_cache(model, cache, out.shape[1] - 1)
    else:  # beam search reorders and may stop early: check the layout only
        check_cache(model, cache, cache.get_seq_length())
    return out


def test_kv_rank_rule():
    assert [kv_rank(192, r) for r in (0.25, 0.5, 0.75)] == [144, 96, 48]
    assert kv_rank(10, 0.99) == 1 and kv_rank(300, 0.3) == 210
    shapes = {
        "l.0.self_attn.k_proj": (192, 576),
        "l.0.self_attn.q_proj": (576, 576),
        "l.0.self_attn.v_proj": (192, 576),
    }
    assert kv_ranks(shapes, 0.5) == {"l.0.self_attn.k_proj": 96, "l.0.self_attn.v_proj": 96}
    for bad in (0, 1, -0.1, float("nan"), "0.5"):
        with pytest.raises(svdkit.SvdkitError, match="kv_ratio"):
            kv_rank(192, bad)


@pytest.mark.parametrize("kind", ["llama", "llama-bias", "qwen2", "mistral-nowindow", "qwen3"])
def test_latent_cache_gives_the_same_tokens_and_a_smaller_cache(kind):
    if kind == "mistral-nowindow":
        torch.manual_seed(0)
        cfg = tiny_config("mistral", sliding_window=None)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    else:
        model = tiny_model(kind)
    low_rank_kv(model, rank=12)
    ids = random_tokens(40)[None]
    with torch.no_grad():
        logits = model(ids).logits
    ordinary = generate(model, ids, max_new_tokens=30, min_new_tokens=30)
    full_bytes = kv_bytes_per_token(model, ids[0])
    assert enable_latent_kv_cache(model) == 2 and latent_kv_enabled(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, ids, max_new_tokens=30, min_new_tokens=30), ordinary)
    # per token and layer: 2 x 32 key/value numbers before, 12 + 12 latent numbers now
    assert kv_bytes_per_token(model, ids[0]) == pytest.approx(full_bytes * 24 / 64)
    keys = set(model.state_dict())
    assert disable_latent_kv_cache(model) == 2 and not latent_kv_enabled(model)
    assert type(model.model.layers[0].self_attn).__name__.startswith(type(model).__name__[:4])
    assert set(model.state_dict()) == keys  # the swap never renames a parameter
    assert torch.equal(generate(model, ids, max_new_tokens=30, min_new_tokens=30), ordinary)


def test_left_padded_batch_and_beam_search_match():
    model = low_rank_kv(tiny_model("qwen3", 1), rank=10)
    ids = torch.stack([random_tokens(40, 1), random_tokens(40, 2)])
    mask = torch.ones_like(ids)
    mask[1, :7], ids[1, :7] = 0, 0  # left padding: generate counts positions from the first real token
    runs = {}
    for mode in ("ordinary", "latent"):
        if mode == "latent":
            enable_latent_kv_cache(model)
        runs[mode] = (
            generate(model, ids, attention_mask=mask, max_new_tokens=24, min_new_tokens=24),
            generate(model, ids, attention_mask=mask, max_new_tokens=8, num_beams=3),
        )
    assert torch.equal(runs["latent"][0], runs["ordinary"][0])
    assert torch.equal(runs["latent"][1], runs["ordinary"][1])


def test_enable_refuses_what_it_cannot_do_and_changes_nothing():
    dense = tiny_model("llama")
    with pytest.raises(svdkit.SvdkitError, match="no k_proj or v_proj .* is low-rank"):
        enable_latent_kv_cache(dense)
    gemma = low_rank_kv(tiny_model("gemma3"), rank=8)
    with pytest.raises(svdkit.SvdkitError, match="supports LlamaAttention.*Gemma3Attention"):
        enable_latent_kv_cache(gemma)
    assert not latent_kv_enabled(gemma)
    torch.manual_seed(0)
    sliding = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen3-sliding")).eval()
    with pytest.raises(svdkit.SvdkitError, match="sliding-window"):
        enable_latent_kv_cache(low_rank_kv(sliding, rank=8))
    assert not latent_kv_enabled(sliding)
    model = low_rank_kv(tiny_model("llama"), rank=8)
    ids = random_tokens(8)[None]
    with torch.no_grad():
        filled = output_cache(model(ids, use_cache=True, **cache_kwargs(model, DynamicCache(config=model.config))))
    enable_latent_kv_cache(model)
    with pytest.raises(svdkit.SvdkitError, match="default DynamicCache"):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, cache_implementation="static", **GREEDY)
    with pytest.raises(svdkit.SvdkitError, match="filled with kv_cache='ordinary'"):
        with torch.no_grad():
            model(random_tokens(2)[None], use_cache=True, **cache_kwargs(model, filled))


def test_a_cache_made_without_config_and_pickling_work():
    model = low_rank_kv(tiny_model("llama"), rank=8)
    ids = random_tokens(20)[None]
    ordinary = generate(model, ids, max_new_tokens=10, cache=DynamicCache())
    enable_latent_kv_cache(model)
    assert torch.equal(generate(model, ids, max_new_tokens=10, cache=DynamicCache()), ordinary)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the swapped classes can be found by name
    buffer.seek(0)
    copy = torch.load(buffer, weights_only=False)
    assert latent_kv_enabled(copy) and torch.equal(generate(copy, ids, max_new_tokens=10), ordinary)


def test_compress_kv_ratio_only_and_with_a_ratio(tiny_tokenizer, text_file, tmp_path):
    calib = dict(calib=text_file, calib_samples=4, calib_seqlen=32, device="cpu", progress=False)
    model = tiny_model("llama")
    r = svdkit.compress(model, tiny_tokenizer, method="svd-llm", ratio=0, kv_ratio=0.5, **calib)
    # only k/v (32 x 64 in the tiny model) are factored, at rank floor(0.5 * 32) = 16
    assert r.ranks == {f"model.layers.{i}.self_attn.{p}": 16 for i in range(2) for p in ("k_proj", "v_proj")}
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    svdkit.save(model, tiny_tokenizer, tmp_path / "kv")
    ordinary, _ = svdkit.load(tmp_path / "kv")
    latent, _ = svdkit.load(tmp_path / "kv", kv_cache="latent")
    assert latent_kv_enabled(latent) and not latent_kv_enabled(ordinary)
    assert ordinary.config.svdkit["kv_ratio"] == 0.5
    ids = random_tokens(24)[None]
    assert torch.equal(generate(latent, ids, max_new_tokens=20), generate(ordinary, ids, max_new_tokens=20))

    # with a ratio: k/v at rank 24 although it is above their break-even 32*64/96 (only the cache shrinks)
    model = tiny_model("llama")
    r = svdkit.compress(model, tiny_tokenizer, method="svd-llm", ratio=0.3, kv_ratio=0.25, **calib)
    assert r.ranks["model.layers.1.self_attn.v_proj"] == 24 > svdkit.rank_for_ratio(32, 64, 0.3)
    assert r.ranks["model.layers.1.mlp.up_proj"] == svdkit.rank_for_ratio(160, 64, 0.3)
    assert len(r.ranks) == 14 and not r.dense_kept


def test_compress_kv_errors(tiny_tokenizer, text_file, tmp_path):
    calib = dict(calib=text_file, calib_samples=2, calib_seqlen=32, device="cpu", progress=False)
    with pytest.raises(svdkit.SvdkitError, match="ratio must be strictly between 0 and 1"):
        svdkit.compress(tiny_model(), tiny_tokenizer, ratio=0, **calib)
    for ratio in (0, 0.3):
        with pytest.raises(svdkit.SvdkitError, match="use the uniform allocation with kv_ratio"):
            svdkit.compress(tiny_model(), tiny_tokenizer, ratio=ratio, kv_ratio=0.5, allocation="v2", **calib)
    with pytest.raises(svdkit.SvdkitError, match="do not pass targets"):
        svdkit.compress(tiny_model(), tiny_tokenizer, ratio=0, kv_ratio=0.5, targets=["k_proj"], **calib)
    with pytest.raises(svdkit.SvdkitError, match="chooses every rank itself"):
        svdkit.compress(tiny_model(), tiny_tokenizer, method="soco", ratio=0.3, kv_ratio=0.5, **calib)
    with pytest.raises(svdkit.SvdkitError, match="needs k_proj/v_proj among the targets"):
        svdkit.compress(tiny_model(), tiny_tokenizer, ratio=0.3, kv_ratio=0.5, targets=["q_proj"], **calib)
    model = tiny_model()
    with pytest.raises(svdkit.SvdkitError, match="kv_ratio must be"):
        svdkit.compress(model, tiny_tokenizer, ratio=0.3, kv_ratio=1.5, **calib)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    with pytest.raises(svdkit.SvdkitError, match="kv_cache must be one of"):
        svdkit.load(tmp_path, kv_cache="compressed")


def test_latent_attention_refuses_a_transformers_api_it_does_not_know(monkeypatch):
    """A release whose attention takes the cache under a new name, or passes it so, is refused, never ignored."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    def renamed(self, hidden_states, position_embeddings=None, attention_mask=None, kv_store=None, **kwargs):
        raise AssertionError("never called")

    model = low_rank_kv(tiny_model("llama"), rank=8)
    future = type("LlamaAttention", (LlamaAttention,), {"forward": renamed})
    for layer in model.model.layers:
        layer.self_attn.__class__ = future
    with pytest.raises(svdkit.SvdkitError, match="does not know the attention API of transformers .*kv_store"):
        enable_latent_kv_cache(model)
    assert not latent_kv_enabled(model)

    model = low_rank_kv(tiny_model("llama"), rank=8)
    enable_latent_kv_cache(model)
    attention, x = model.model.layers[0].self_attn, torch.zeros(1, 3, 64)
    with pytest.raises(svdkit.SvdkitError, match="passes the KV cache to attention as 'kv_store'"):
        attention(x, attention_mask=None, kv_store=DynamicCache(config=model.config))
