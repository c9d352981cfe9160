"""``svdkit generate``: greedy generation from a prompt, with the ordinary or the latent KV cache."""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from ..core.compat import cache_kwargs
from ..core.device import model_device
from ..core.options import context_length
from ..errors import SvdkitError
from ..pipeline.options import CompressionOptions
from ..saved.kvcache import KV_MODES, kv_cache_bytes
from ..sources.models import load
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


class _FirstToken(LogitsProcessor):
    """Records when generate() first scores: the end of the prompt's forward (the prefill)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        self.at = self.at or time.perf_counter()
        return scores


def _torch_generate(model, ids, a, pad) -> tuple[torch.Tensor, dict, dict]:
    """Greedy generation with transformers; (tokens, timing, cache facts). Checks the cache was used."""
    cache = DynamicCache(config=model.config)
    first = _FirstToken()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=a.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            logits_processor=LogitsProcessorList([first]),
            **cache_kwargs(model, cache),
        )
    end = time.perf_counter()
    cached = cache.get_seq_length()
    if cached != out.shape[1] - 1:  # the last token is never fed back; anything else means the cache went unused
        raise SvdkitError(
            f"the {a.kv_cache} KV cache holds {cached} tokens after generating {out.shape[1]} in all (expected "
            f"{out.shape[1] - 1}): this transformers release does not use svdkit's cache as expected, so the text is "
            "not trusted; use the transformers release in svdkit's lock"
        )
    decoded = out.shape[1] - ids.shape[1] - 1
    timing = {"prompt_s": first.at - start, "decode_s": end - first.at, "decoded_tokens": decoded}
    facts = {"kv_cache": a.kv_cache, "kv_bytes_per_token": kv_cache_bytes(cache) / max(cached, 1)}
    return out, timing, {**facts, "kv_tokens_cached": cached}


def run(a: argparse.Namespace) -> None:
    model, tok = load(a.model, device=a.device, dtype=a.dtype, kv_cache=a.kv_cache)
    ids = tok(a.prompt, return_tensors="pt").input_ids.to(model_device(model))
    if ids.numel() == 0:
        raise SvdkitError("--prompt is empty after tokenization: give some text")
    context = context_length(model)
    if context is not None and ids.shape[1] + a.max_new_tokens > context:
        raise SvdkitError(
            f"a prompt of {ids.shape[1]} tokens and --max-new-tokens {a.max_new_tokens} pass the model's context of "
            f"{context} tokens (max_position_embeddings): give --max-new-tokens of at most {context - ids.shape[1]}"
            if ids.shape[1] < context
            else f"the prompt's {ids.shape[1]} tokens fill the model's context of {context} tokens: shorten it"
        )
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if not isinstance(model, torch.nn.Module):  # a runtime of its own (an ONNX export) times itself
        out = model.generate(ids, max_new_tokens=a.max_new_tokens, pad_token_id=pad)
        timing, facts = model.last_timing, {"runtime": model.runtime}
    else:
        out, timing, facts = _torch_generate(model, ids, a, pad)
        facts["runtime"] = "torch"
    new = out[0, ids.shape[1] :]
    text = tok.decode(new, skip_special_tokens=True)
    rate = timing["decoded_tokens"] / timing["decode_s"] if timing["decode_s"] > 0 else float("nan")
    print(a.prompt + text)
    cache_note = (
        f"; {a.kv_cache} KV cache: {facts['kv_bytes_per_token']:,.0f} bytes per token ({facts['kv_tokens_cached']} "
        "tokens cached)"
        if "kv_cache" in facts
        else ""
    )
    print(
        f"{new.numel()} tokens ({facts['runtime']}): prompt of {ids.shape[1]} tokens and first token "
        f"{timing['prompt_s']:.3f}s, then {timing['decoded_tokens']} tokens in {timing['decode_s']:.2f}s "
        f"({rate:.1f} tokens/s decode){cache_note}"
    )
    summary = {"text": text, "tokens": new.tolist(), "decode_tokens_per_s": rate, **timing, **facts}
    summary["seconds"] = round(timing["prompt_s"] + timing["decode_s"], 3)
    emit(summary, a.json)
