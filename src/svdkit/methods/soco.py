"""SoCo: learned singular-spectrum scores (Singular spectrum optimization, 2025; METHODS.md).

Every target is factored once by an activation-aware base method (default svd-llm-v2) at a generous
start rank, W ~ B A = sum_j b_j a_j^T with the singular values split into both factors. One score s_j
per component is then learned across the whole model, W' = B diag(s) A (= U diag(S * s) V^T in the
base's whitened basis), factors frozen, under a global parameter budget, and the components with the
smallest scores are pruned: see :mod:`svdkit.spectrum` for the three stages. The result is an
ordinary low-rank model with the kept scores folded into the factors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..allocation import rank_for_ratio, saves_parameters
from ..statistics import LinearStats
from .registry import Factors, ModelStage, get_method, make_config, method_names, register

__all__ = ["SoCoConfig", "soco", "start_ranks"]

_STATISTICS = frozenset({"gram"})


@dataclass
class SoCoConfig:
    base: str = "svd-llm-v2"
    """the method that factors each matrix once (its statistics must be among: gram)"""
    start_ratio: float = 0.0
    """ratio of the start decomposition; 0 = the largest rank that still saves parameters"""
    steps: int = 240
    """training steps in all (one step = `batch` windows of `seqlen` tokens)"""
    coarse: float = 0.5
    """share of the steps that move the budget from the start count down to the target"""
    refine: float = 0.3
    """share of the steps trained at the target budget before the final pruning (the rest: after it)"""
    penalty_lr: float = 0.3
    """dual-ascent step of the count penalty's weight (per unit of the count's excess, relative to the cut)"""
    lr: float = 0.02
    """Adam learning rate of the scores (they start at 1)"""
    anneal: bool = True
    """in the final stage the learning rate falls linearly from lr toward 0"""
    seqlen: int = 512
    """tokens per training window (the calibration windows are cut to this length)"""
    batch: int = 1
    """windows per step"""
    seed: int = 0
    """order of the training windows"""
    loss: str = "ce"
    """"ce": next-token cross-entropy (the paper); "kd": KL divergence from the start decomposition's
    next-token distributions (a teacher forward per step)"""
    log: str | None = None
    """a file that receives one JSON line per step (step, stage, objective, loss, kept, soft, target, penalty, lr,
    seconds)"""

    def __post_init__(self) -> None:
        if not isinstance(self.base, str) or self.base == "soco":
            raise ValueError(f"base must name another method, got {self.base!r}")
        if self.base in method_names():
            need = get_method(self.base).requires
            if not need <= _STATISTICS:
                raise ValueError(
                    f"base '{self.base}' needs statistics {sorted(need - _STATISTICS)} that soco does not "
                    "collect: choose svd, svd-llm, svd-llm-v2, nsvd or nsvd2"
                )
        else:
            raise ValueError(f"unknown base method {self.base!r}; known: {', '.join(method_names())}")
        for name in ("start_ratio", "coarse", "refine", "lr", "penalty_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"{name} must be a number, got {v!r}")
        if not 0 <= self.start_ratio < 1:
            raise ValueError(f"start_ratio must be in [0, 1), got {self.start_ratio}")
        if not (0 <= self.coarse and 0 <= self.refine and self.coarse + self.refine <= 1):
            raise ValueError(
                f"coarse and refine are shares of the steps: >= 0 with a sum <= 1, got {self.coarse}, {self.refine}"
            )
        if self.loss not in ("ce", "kd"):
            raise ValueError(f"loss must be 'ce' or 'kd', got {self.loss!r}")
        if not isinstance(self.anneal, bool):
            raise ValueError(f"anneal must be true or false, got {self.anneal!r}")
        if not self.penalty_lr > 0:
            raise ValueError(f"penalty_lr must be positive, got {self.penalty_lr}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("steps", "seqlen", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.log is not None:
            if not isinstance(self.log, str) or not self.log:
                raise ValueError(f"log must be a file path, got {self.log!r}")
            if not Path(self.log).parent.is_dir():
                raise ValueError(f"log: folder '{Path(self.log).parent}' does not exist")


def start_ranks(shapes: Mapping[str, tuple[int, int]], config: SoCoConfig) -> dict[str, int]:
    """The start rank of each target: rank_for_ratio at `start_ratio`, lowered until the pair saves parameters."""
    out = {}
    for name, (m, n) in shapes.items():
        k = min(rank_for_ratio(m, n, config.start_ratio), m, n)
        while k > 1 and not saves_parameters(m, n, k):
            k -= 1
        out[name] = k
    return out


def _run(model, context, budget, config):
    from ..spectrum import learn_spectrum

    return learn_spectrum(model, context, budget, config)


@register(
    "soco",
    SoCoConfig,
    requires=tuple(_STATISTICS),
    summary="learned singular-spectrum scores under a global budget (trains on the calibration windows)",
    paper="SoCo, singular spectrum optimization, 2025",
    stage=ModelStage(start_ranks=start_ranks, run=_run),
)
def soco(W: torch.Tensor, stats: LinearStats | None, rank: int, config: SoCoConfig) -> Factors:
    """The base method's factors at the start rank (the scores are learned later, on the whole model)."""
    base = get_method(config.base)
    return base.decompose(W, stats, rank, make_config(base))
