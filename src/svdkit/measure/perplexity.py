"""Perplexity on non-overlapping windows: exp of the mean next-token NLL over all predicted tokens."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..core.device import model_device, resolve_device
from ..core.lowrank import count_parameters
from ..core.options import check_context, context_length, integer
from ..errors import SvdkitError, SvdkitWarning
from ..sources.text import eval_windows, source_tokens

__all__ = ["PerplexityResult", "perplexity", "window_nll"]


@dataclass
class PerplexityResult:
    ppl: float
    windows: int
    tokens: int
    """predicted tokens (seqlen - 1 per window)"""
    nll: float
    """mean negative log-likelihood per predicted token (nats)"""
    params: int
    nonfinite_windows: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor) -> float:
    """Summed next-token NLL (float64) of one window `ids` (1-D) under `model`."""
    logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].float()
    return float(F.cross_entropy(logits, ids[1:], reduction="sum").double())


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer=None,
    source: str | os.PathLike | torch.Tensor = "demo",
    seqlen: int = 2048,
    max_windows: int | None = None,
    offset: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on consecutive windows of `source` (a text source or token ids).

    `device`, if given, moves the model there first. No window is dropped: a window whose loss is not
    finite makes the result non-finite and is listed in ``nonfinite_windows`` (with a warning). A
    `seqlen` beyond the model's context is refused before any text is read.
    """
    try:
        integer(2)("seqlen", seqlen)
    except ValueError as e:
        raise SvdkitError(str(e)) from None
    check_context(seqlen, context_length(model), "evaluation windows", "--seqlen / seqlen")
    windows = eval_windows(source_tokens(tokenizer, source), seqlen, max_windows, offset)
    if device is not None:
        model.to(resolve_device(device))
    dev = model_device(model)
    was_training = model.training
    model.eval()
    total, bad = 0.0, []
    bar = tqdm(windows, desc="perplexity", unit="window", disable=not progress, leave=False)
    for i, ids in enumerate(bar):
        nll = window_nll(model, ids.to(dev))
        if not math.isfinite(nll):
            bad.append(i)
        total += nll
        count = (i + 1) * (seqlen - 1)
        bar.set_postfix(ppl=f"{math.exp(min(total / count, 700)):.3f}")
    model.train(was_training)
    tokens = len(windows) * (seqlen - 1)
    mean = total / tokens
    if bad:
        warnings.warn(
            f"non-finite loss in evaluation window(s) {bad}: perplexity is not finite",
            category=SvdkitWarning,
            stacklevel=3,
        )
    ppl = math.exp(mean) if mean < 709 else math.inf
    return PerplexityResult(ppl, len(windows), tokens, mean, count_parameters(model), bad)
