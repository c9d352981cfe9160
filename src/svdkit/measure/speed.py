"""Speed and memory of a model, measured the same way for the dense and the compressed one.

- prefill: tokens/s of a generation prefill over a (1, seqlen) prompt, as ``generate`` runs it: one
  forward that fills a fresh KV cache and computes the logits of the last position only
  (``logits_to_keep=1``); median of `repeats` after a warm-up;
- forward: tokens/s of one forward over the window with the logits of every position and no cache
  (what perplexity evaluation and scoring run); the vocabulary projection (49,152 x 576 in
  SmolLM2-135M, never compressed) is a fifth of its work;
- decode: tokens/s of batch-1 greedy generation with the KV cache (``generate``, exactly
  `new_tokens` new tokens after a short prompt), median of `repeats` after a warm-up;
- paired: the compressed model and the dense one timed in alternation (:func:`paired_speed`), so
  that their ratio is not the drift of a shared machine between two measurements minutes apart;
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from ..core.compat import cache_kwargs
from ..core.device import model_device
from ..saved.folder import save

__all__ = [
    "paired_speed",
    "prefill",
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
    return model_device(model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model: nn.Module, x: torch.Tensor):
    """One generation prefill of x (1, L): a fresh cache filled, the last position's logits only."""
    keep = {"logits_to_keep": 1} if getattr(model, "_supports_logits_to_keep", lambda: False)() else {}
    return model(input_ids=x, use_cache=True, **cache_kwargs(model, DynamicCache(config=model.config)), **keep)


def _timed(run, dev: torch.device) -> float:
    _sync(dev)
    t = time.perf_counter()
    run()
    _sync(dev)
    return time.perf_counter() - t


def _runs(model: nn.Module, ids: torch.Tensor, new_tokens: int, prompt: int) -> dict[str, tuple]:
    """What is timed, as (work, tokens it counts): prefill, forward and (if new_tokens) decode."""
    if not isinstance(model, nn.Module):  # a runtime of its own (an ONNX export) says what it times
        return model.timed_runs(ids, new_tokens, prompt)
    dev = _device(model)
    x = ids[None].to(dev)
    p = x[:, :prompt]
    pad = getattr(model.config, "eos_token_id", None)
    pad = pad[0] if isinstance(pad, list) else pad
    gen = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=pad)
    runs = {
        "prefill_tok_s": (lambda: prefill(model, x), ids.numel()),
        "forward_tok_s": (lambda: model(input_ids=x, use_cache=False), ids.numel()),
    }
    if new_tokens:
        runs["decode_tok_s"] = (lambda: model.generate(p, **gen), new_tokens)
    return runs


def paired_speed(
    models: Mapping[str, nn.Module],
    ids: torch.Tensor,
    new_tokens: int = 64,
    prompt: int = 32,
    repeats: int = 3,
    only: tuple[str, ...] | None = None,
) -> dict[str, dict[str, float]]:
    """Prefill, forward and decode tokens/s of several models, timed interleaved: name -> {key: median}.

    Each of `repeats` rounds times every model once per measurement, one after the other, so drift
    of a shared machine (other tenants, clock changes) hits all models alike and their ratios stay
    fair; one warm-up run each first. `ids` (1-D) is the prefill window, its first `prompt` tokens
    the decode prompt; decode generates exactly `new_tokens` tokens (none if 0). `only` keeps some
    of the keys ``prefill_tok_s``, ``forward_tok_s``, ``decode_tok_s``.
    """
    plans = {name: _runs(m, ids, new_tokens, prompt) for name, m in models.items()}
    if only is not None:
        plans = {name: {k: v for k, v in plan.items() if k in only} for name, plan in plans.items()}
    times: dict[str, dict[str, list[float]]] = {name: {k: [] for k in plan} for name, plan in plans.items()}
    with torch.no_grad():
        for plan in plans.values():
            for run, _ in plan.values():
                run()  # warm-up
        for _ in range(repeats):
            for key in next(iter(plans.values())):
                for name, plan in plans.items():
                    run, _ = plan[key]
                    times[name][key].append(_timed(run, _device(models[name])))
    return {
        name: {key: plan[key][1] / statistics.median(times[name][key]) for key in plan} for name, plan in plans.items()
    }


def prefill_tokens_per_second(model: nn.Module, ids: torch.Tensor, repeats: int = 3) -> float:
    """Median tokens/s of a generation prefill of `ids` (1-D): cache filled, last logits only."""
    return paired_speed({"m": model}, ids, 0, repeats=repeats, only=("prefill_tok_s",))["m"]["prefill_tok_s"]


def forward_tokens_per_second(model: nn.Module, ids: torch.Tensor, repeats: int = 3) -> float:
    """Median tokens/s of one forward over `ids` (1-D) with every position's logits and no cache."""
    return paired_speed({"m": model}, ids, 0, repeats=repeats, only=("forward_tok_s",))["m"]["forward_tok_s"]


def decode_tokens_per_second(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 64, repeats: int = 3) -> float:
    """Median tokens/s of greedy batch-1 generation of exactly `new_tokens` after `prompt` (1-D ids)."""
    out = paired_speed({"m": model}, prompt, new_tokens, prompt.numel(), repeats, only=("decode_tok_s",))
    return out["m"]["decode_tok_s"]


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
            prefill(model, x)
            torch.cuda.synchronize(dev)
            return (torch.cuda.max_memory_allocated(dev) - before) / _MB
        if not reset_peak_rss():
            return None
        before = _status_mb("VmRSS")
        prefill(model, x)
        peak = _status_mb("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0.0)


def saved_size_mb(model: nn.Module) -> float:
    """MiB of the model files :func:`svdkit.save` writes for `model` (into a temporary folder, then removed)."""
    with tempfile.TemporaryDirectory(prefix="svdkit-size-") as tmp:
        folder = save(model, None, Path(tmp) / "model")
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / _MB


def measure(
    model: nn.Module,
    ids: torch.Tensor,
    decode_tokens: int = 64,
    prompt: int = 32,
    repeats: int = 3,
    reference: nn.Module | None = None,
) -> dict[str, Any]:
    """Every number above for `model`, with `ids` (1-D) as the prefill window and its start as the prompt.

    With a `reference` model (the dense one), its speeds are timed interleaved with `model`'s
    (:func:`paired_speed`) and returned under ``"reference"``, for a fair ratio.
    """
    models = {"model": model, **({"reference": reference} if reference is not None else {})}
    speed = paired_speed(models, ids, decode_tokens, prompt, repeats)
    out: dict[str, Any] = {
        **speed["model"],
        "weights_mb": weights_mb(model),
        "prefill_peak_mb": prefill_peak_mb(model, ids),
        "file_mb": saved_size_mb(model),
    }
    if reference is not None:
        out["reference"] = speed["reference"]
    return out
