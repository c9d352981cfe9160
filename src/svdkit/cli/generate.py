"""``svdkit generate``: greedy generation from a prompt, with the ordinary or the latent KV cache."""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

from ..core.compat import cache_kwargs
from ..errors import SvdkitError
from ..pipeline.options import CompressionOptions
from ..saved.folder import load
from ..saved.kvcache import KV_MODES, kv_cache_bytes
from .common import add_dtype, add_fields, emit, positive

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="greedy generation from a prompt, with the ordinary or the latent KV cache")
    g.add_argument("model", help="model folder (compressed or not), hub id, .gguf file, or 'smollm2-135m'")
    g.add_argument("--prompt", default="The history of the city begins", help="text to continue")
    g.add_argument("--max-new-tokens", type=positive, default=32, help="tokens to generate (32)")
    g.add_argument(
        "--kv-cache",
        choices=KV_MODES,
        default="ordinary",
        help="latent: cache A x of the low-rank k_proj/v_proj instead of keys and values (default ordinary)",
    )
    add_fields(g, CompressionOptions, {"device": {}})
    add_dtype(g)
    g.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    g.set_defaults(run=run)


def run(a: argparse.Namespace) -> None:
    model, tok = load(a.model, device=a.device, dtype=a.dtype, kv_cache=a.kv_cache)
    ids = tok(a.prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    if ids.numel() == 0:
        raise SvdkitError("--prompt is empty after tokenization: give some text")
    cache = DynamicCache(config=model.config)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=a.max_new_tokens, do_sample=False, pad_token_id=pad, **cache_kwargs(model, cache)
        )
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1] :]
    cached = cache.get_seq_length()
    if cached != out.shape[1] - 1:  # the last token is never fed back; anything else means the cache went unused
        raise SvdkitError(
            f"the {a.kv_cache} KV cache holds {cached} tokens after generating {out.shape[1]} in all (expected "
            f"{out.shape[1] - 1}): this transformers release does not use svdkit's cache as expected, so the text is "
            "not trusted; use the transformers release in svdkit's lock"
        )
    text = tok.decode(new, skip_special_tokens=True)
    per_token = kv_cache_bytes(cache) / max(cached, 1)
    print(a.prompt + text)
    print(
        f"{new.numel()} tokens in {seconds:.2f}s ({new.numel() / seconds:.1f} tokens/s, prompt included); "
        f"{a.kv_cache} KV cache: {per_token:,.0f} bytes per token ({cached} tokens cached)"
    )
    emit(
        {
            "text": text,
            "tokens": new.tolist(),
            "seconds": round(seconds, 3),
            "kv_cache": a.kv_cache,
            "kv_bytes_per_token": per_token,
            "kv_tokens_cached": cached,
        },
        a.json,
    )
