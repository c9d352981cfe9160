"""Speed and memory of a model, measured the same way for the dense and the compressed one.

- prefill: tokens/s of a generation prefill over a (1, seqlen) prompt, as ``generate`` runs it: one
  forward that fills a fresh KV cache and computes the logits of the last position only
  (``logits_to_keep=1``); median of `repeats` after a warm-up;
- forward: tokens/s of one forward over the window with the logits of every position and no cache
  (what perplexity evaluation and scoring run); the vocabulary projection (49,152 x 576 in
  SmolLM2-135M, never compressed) is a fifth of its work;
- decode: tokens/s of batch-1 greedy generation with the KV cache (``generate``, exactly
  `new_tokens` new tokens after a short prompt), median of `repeats` after a warm-up;
- memory: the bytes of the weights, and the peak memory a prefill adds on top of what is resident
  (CUDA: ``max_memory_allocated``; CPU: the process's peak resident set, VmHWM, reset through
  ``/proc/self/clear_refs`` on Linux, else not measured);
- file size: the bytes of the model files :func:`svdkit.save` writes (config and safetensors; no tokenizer).
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "prefill_tokens_per_second",
    "forward_tokens_per_second",
    "decode_tokens_per_second",
    "weights_mb",
    "prefill_peak_mb",
    "saved_size_mb",
    "reset_peak_rss",
    "peak_rss_mb",
    "measure",
]

_MB = 1024 * 1024


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill(model: nn.Module, x: torch.Tensor):
    """One generation prefill of x (1, L): a fresh cache filled, the last position's logits only."""
    from transformers import DynamicCache

    keep = {"logits_to_keep": 1} if getattr(model, "_supports_logits_to_keep", lambda: False)() else {}
    return model(input_ids=x, past_key_values=DynamicCache(config=model.config), use_cache=True, **keep)


def _median_time(run, dev: torch.device, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(dev)
        t = time.perf_counter()
        run()
        _sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def prefill_tokens_per_second(model: nn.Module, ids: torch.Tensor, repeats: int = 3) -> float:
    """Median tokens/s of a generation prefill of `ids` (1-D): cache filled, last logits only."""
    dev = _device(model)
    x = ids[None].to(dev)
    with torch.no_grad():
        return ids.numel() / _median_time(lambda: _prefill(model, x), dev, repeats)


def forward_tokens_per_second(model: nn.Module, ids: torch.Tensor, repeats: int = 3) -> float:
    """Median tokens/s of one forward over `ids` (1-D) with every position's logits and no cache."""
    dev = _device(model)
    x = ids[None].to(dev)
    with torch.no_grad():
        return ids.numel() / _median_time(lambda: model(input_ids=x, use_cache=False), dev, repeats)


def decode_tokens_per_second(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 64, repeats: int = 3) -> float:
    """Median tokens/s of greedy batch-1 generation of exactly `new_tokens` after `prompt` (1-D ids)."""
    dev = _device(model)
    x = prompt[None].to(dev)
    pad = getattr(model.config, "eos_token_id", None)
    if isinstance(pad, list):
        pad = pad[0]
    kwargs = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=pad)
    times = []
    with torch.no_grad():
        model.generate(x, **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4})
        for _ in range(repeats):
            _sync(dev)
            t = time.perf_counter()
            out = model.generate(x, **kwargs)
            _sync(dev)
            times.append(time.perf_counter() - t)
    produced = out.shape[1] - x.shape[1]
    return produced / statistics.median(times)


def weights_mb(model: nn.Module) -> float:
    """Bytes of the parameters and buffers (shared tensors counted once), in MiB."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / _MB


def reset_peak_rss() -> bool:
    """Reset the process's peak resident set (Linux: VmHWM via /proc/self/clear_refs); False if impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set of the process since the last :func:`reset_peak_rss` (else since it started), MiB."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prefill_peak_mb(model: nn.Module, ids: torch.Tensor) -> float | None:
    """Peak memory one generation prefill of `ids` adds above what is resident before it, MiB (None if unmeasurable)."""
    dev = _device(model)
    x = ids[None].to(dev)
    with torch.no_grad():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            before = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            _prefill(model, x)
            torch.cuda.synchronize(dev)
            return (torch.cuda.max_memory_allocated(dev) - before) / _MB
        if not reset_peak_rss():
            return None
        before = _status_mb("VmRSS")
        _prefill(model, x)
        peak = _status_mb("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0.0)


def saved_size_mb(model: nn.Module) -> float:
    """MiB of the model files :func:`svdkit.save` writes for `model` (into a temporary folder, then removed)."""
    from .io import save

    with tempfile.TemporaryDirectory(prefix="svdkit-size-") as tmp:
        folder = save(model, None, Path(tmp) / "model")
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / _MB


def measure(
    model: nn.Module, ids: torch.Tensor, decode_tokens: int = 64, prompt: int = 32, repeats: int = 3
) -> dict[str, float | None]:
    """Every number above for `model`, with `ids` (1-D) as the prefill window and its start as the prompt."""
    return {
        "prefill_tok_s": prefill_tokens_per_second(model, ids, repeats),
        "forward_tok_s": forward_tokens_per_second(model, ids, repeats),
        "decode_tok_s": decode_tokens_per_second(model, ids[:prompt], decode_tokens, repeats)
        if decode_tokens
        else None,
        "weights_mb": weights_mb(model),
        "prefill_peak_mb": prefill_peak_mb(model, ids),
        "file_mb": saved_size_mb(model),
    }
