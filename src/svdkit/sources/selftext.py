"""Calibration text the dense model writes itself (``--calib self``), for a user with no data of their own.

Following LLM-QAT (Liu et al. 2023, "LLM-QAT: Data-Free Quantization Aware Training for Large Language
Models", arXiv 2305.17888): each window starts with a token drawn uniformly from the vocabulary (the
tokenizer's special tokens left out), continues with :data:`GREEDY` greedy (top-1) tokens, then samples
every further token from the model's softmax at temperature 1, up to exactly ``seqlen`` tokens. Special
tokens (EOS, BOS, padding, ...) are never drawn, so no window ends early.

Window i draws its random numbers from its own ``torch.Generator`` seeded from (seed, i), on the CPU, so a
seed gives the same windows on the CPU whatever the batching; the windows are generated
:data:`BATCH` at a time with a KV cache. The result is cached under svdkit's cache folder
(``self-text/``), keyed by the model's fingerprint (:func:`~svdkit.core.fingerprint.model_fingerprint`),
the window length, the seed, the excluded tokens and :data:`SELF_TEXT_VERSION` (the generation settings;
fewer windows than cached are the cached set's first ones), and written atomically (a temporary file
renamed into place), so a second run reuses it and a killed run leaves no half-written cache.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..core.compat import cache_kwargs, output_cache
from ..core.device import model_device
from ..core.fingerprint import digest, model_fingerprint
from ..errors import SvdkitError, SvdkitWarning
from .models import cache_dir

__all__ = ["BATCH", "GREEDY", "SELF_TEXT_VERSION", "allowed_tokens", "generate_windows", "self_windows"]

SELF_TEXT_VERSION = 1
"""the version of the generation settings below (part of the cache key): raise it when they change"""
GREEDY = 4
"""greedy tokens after the uniformly drawn first one"""
BATCH = 8
"""windows generated together"""


def allowed_tokens(model: nn.Module, tokenizer: Any) -> torch.Tensor:
    """A boolean mask over the model's output vocabulary: the tokenizer's tokens but its special ones (and
    the model config's BOS / EOS / padding ids)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[: min(len(tokenizer), vocab)] = True
    special = set(tokenizer.all_special_ids)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        special |= set(value) if isinstance(value, list | tuple) else {value} if isinstance(value, int) else set()
    allowed[[i for i in special if 0 <= i < vocab]] = False
    if not allowed.any():
        raise SvdkitError("calibration text 'self': the tokenizer has no ordinary token the model can write")
    return allowed


def _generator(seed: int, window: int) -> torch.Generator:
    """Window `window`'s own random numbers for `seed`."""
    return torch.Generator().manual_seed(int(digest(f"self-text:{seed}:{window}".encode())[:15], 16))


def _sample(logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row from softmax(logits) (masked entries are -inf), by inverse CDF on the CPU."""
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]  # right: never a zero-chance token
    last = int(torch.isfinite(logits[0]).nonzero().max())  # rounding at the very top of the CDF
    return picked.clamp(max=last)


@torch.no_grad()
def _batch(
    model: nn.Module, allowed: torch.Tensor, first: int, count: int, seqlen: int, seed: int, bar
) -> torch.Tensor:
    """Windows first .. first + count - 1 (count x seqlen)."""
    generators = [_generator(seed, first + i) for i in range(count)]
    ids = allowed.nonzero()[:, 0]
    out = torch.empty(count, seqlen, dtype=torch.long)
    out[:, 0] = torch.stack([ids[torch.randint(len(ids), (), generator=g)] for g in generators])
    bar.update(count)
    device, cache = model_device(model), DynamicCache(config=model.config)
    for t in range(1, seqlen):
        step = model(input_ids=out[:, t - 1 : t].to(device), use_cache=True, **cache_kwargs(model, cache))
        cache = output_cache(step) or cache
        logits = step.logits[:, -1].float().cpu().masked_fill(~allowed, float("-inf"))
        out[:, t] = logits.argmax(-1) if t <= GREEDY else _sample(logits, generators)
        bar.update(count)
    return out


def generate_windows(
    model: nn.Module, tokenizer: Any, n: int, seqlen: int, seed: int = 0, progress: bool = False
) -> torch.Tensor:
    """`n` windows of exactly `seqlen` tokens written by `model` (see the module docstring); not cached."""
    allowed = allowed_tokens(model, tokenizer)
    was_training = model.training
    model.eval()
    bar = tqdm(total=n * seqlen, desc="writing calibration text (self)", unit="tok", disable=not progress)
    try:
        batches = [_batch(model, allowed, i, min(BATCH, n - i), seqlen, seed, bar) for i in range(0, n, BATCH)]
    finally:
        bar.close()
        model.train(was_training)
    return torch.cat(batches)


def _key(model: nn.Module, allowed: torch.Tensor, seqlen: int, seed: int) -> dict[str, Any]:
    """What the cached windows depend on (not their count: window i depends on (seed, i) alone, so the
    first n windows of a larger cached set are the n windows asked for)."""
    return {
        "version": SELF_TEXT_VERSION,
        "model": model_fingerprint(model),
        "seqlen": seqlen,
        "seed": seed,
        "allowed": digest(allowed.numpy().tobytes()),
    }


def _load(path: Path, key: dict[str, Any], n: int) -> torch.Tensor | None:
    """The first `n` cached windows at `path` when it holds at least `n` written for `key`, else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            kept, windows = json.loads((f.metadata() or {})["key"]), f.get_tensor("windows")
        if kept != key or windows.dim() != 2 or windows.shape[1] != key["seqlen"]:
            raise ValueError("written for other settings")
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        warnings.warn(
            f"ignoring the self-text cache {path} ({e}); writing the text again", category=SvdkitWarning, stacklevel=3
        )
        return None
    return windows[:n] if windows.shape[0] >= n else None


def _save(path: Path, windows: torch.Tensor, key: dict[str, Any]) -> None:
    """Write the windows atomically (a temporary file renamed into place); on failure warn and go on."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".self-text-", suffix=".partial")
        os.close(fd)
        save_file({"windows": windows.contiguous()}, tmp, metadata={"key": json.dumps(key, sort_keys=True)})
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        warnings.warn(
            f"could not write the self-text cache {path} ({e}); going on without it",
            category=SvdkitWarning,
            stacklevel=3,
        )


def self_windows(
    model: nn.Module, tokenizer: Any, n: int, seqlen: int, seed: int = 0, progress: bool = False
) -> torch.Tensor:
    """:func:`generate_windows`, cached under ``<svdkit cache>/self-text/`` by the model's fingerprint and the
    settings: a second call with the same model and settings reads the cache and runs no model, and so does
    one asking for fewer windows than the cache holds (their first ones); more windows are written anew."""
    key = _key(model, allowed_tokens(model, tokenizer), seqlen, seed)
    path = cache_dir() / "self-text" / f"{digest(json.dumps(key, sort_keys=True).encode())}.safetensors"
    cached = _load(path, key, n)
    if cached is not None:
        return cached
    windows = generate_windows(model, tokenizer, n, seqlen, seed, progress)
    _save(path, windows, key)
    return windows
