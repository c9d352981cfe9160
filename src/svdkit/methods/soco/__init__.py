"""SoCo: learned singular-spectrum scores (Singular spectrum optimization, 2025).

Every target is factored once by an activation-aware base method (default svd-llm-v2) at a generous
start rank, W ~ B A = sum_j b_j a_j^T with the singular values split into both factors. One score s_j
per component is then learned across the whole model, W' = B diag(s) A (= U diag(S * s) V^T in the
base's whitened basis), factors frozen, under a global parameter budget, and the components with the
smallest scores are pruned: see :mod:`svdkit.methods.soco.training` for the three phases. The result is an
ordinary low-rank model with the kept scores folded into the factors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...calibration.statistics import LinearStats
from ...core.options import Options, boolean, choice, integer, number, option, path
from ...core.ranks import rank_for_ratio, saves_parameters
from ...errors import SvdkitError
from ..base import METHODS, Factors, MethodTraining, get_method, make_config, method_names, register
from .training import learn_spectrum

__all__ = ["SoCoConfig", "soco", "start_ranks"]

_STATISTICS = frozenset({"gram"})


def _log_file(name: str, v: Any) -> Any:
    path(optional=True)(name, v)
    if v is not None and not Path(v).parent.is_dir():
        raise ValueError(f"{name}: folder '{Path(v).parent}' does not exist")
    return v


@dataclass
class SoCoConfig(Options):
    base: str = option("svd-llm-v2", "the method that factors each matrix once (its statistics must be among: gram)")
    start_ratio: float = option(
        0.0,
        "ratio of the start decomposition; 0 = the largest rank that still saves parameters",
        number(0, 1, hi_open=True),
    )
    steps: int = option(
        0,
        "training steps in all (one step = `batch` windows of `seqlen` tokens); 0: `epochs` passes over the "
        "training windows, at most `max_steps`",
        integer(0),
    )
    epochs: float = option(2.0, "passes over the training windows when steps=0", number(0, lo_open=True))
    max_steps: int = option(240, "at most this many steps when steps=0", integer(1))
    held_out: float = option(
        0.125,
        "share of the calibration windows held out (at least one): the final phase keeps its best step on them, "
        "and the result falls back to the closed form at the budget's ranks where that is better there",
        number(0, 1, lo_open=True, hi_open=True),
    )
    guard: bool = option(
        True,
        "hold windows out as `held_out` says; false: train on all of them and keep the last step (the paper)",
        boolean(),
    )
    eval_windows: int = option(8, "held-out windows of `seqlen` measured each time (at most)", integer(1))
    every: int = option(8, "final-phase steps between held-out measurements", integer(1))
    coarse: float = option(0.5, "share of the steps that move the budget from the start count to the target", number())
    refine: float = option(
        0.3, "share of the steps trained at the target budget before the final pruning (the rest: after it)", number()
    )
    penalty_lr: float = option(
        0.3,
        "dual-ascent step of the count penalty's weight (per unit of the count's excess, relative to the cut)",
        number(0, lo_open=True),
    )
    lr: float = option(0.02, "Adam learning rate of the scores (they start at 1)", number(0, lo_open=True))
    anneal: bool = option(True, "in the final phase the learning rate falls linearly from lr toward 0", boolean())
    seqlen: int = option(512, "tokens per training window (calibration windows are cut to this length)", integer(2))
    batch: int = option(1, "windows per step", integer(1))
    seed: int = option(0, "order of the training windows", integer())
    loss: str = option(
        "ce",
        '"ce": next-token cross-entropy (the paper); "kd": KL divergence from the start decomposition\'s '
        "next-token distributions (a teacher forward per step)",
        choice("ce", "kd"),
    )
    log: str | None = option(
        None,
        "a file that receives one JSON line per step (step, phase, objective, loss, kept, soft, target, penalty, "
        "lr, seconds)",
        _log_file,
    )

    def check(self) -> None:
        if not isinstance(self.base, str) or self.base == "soco":
            raise ValueError(f"base must name another method, got {self.base!r}")
        if self.base not in METHODS:
            raise ValueError(f"unknown base method {self.base!r}; known: {', '.join(method_names())}")
        if get_method(self.base).ranks is not None:
            raise ValueError(f"base '{self.base}' sets its own ranks, so soco has no spectrum to choose from")
        need = get_method(self.base).requires
        if not need <= _STATISTICS:
            raise ValueError(
                f"base '{self.base}' needs statistics {sorted(need - _STATISTICS)} that soco does not "
                "collect: choose svd, svd-llm, svd-llm-v2, nsvd or nsvd2"
            )
        if not (0 <= self.coarse and 0 <= self.refine and self.coarse + self.refine <= 1):
            raise ValueError(
                f"coarse and refine are shares of the steps: >= 0 with a sum <= 1, got {self.coarse}, {self.refine}"
            )


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
    return learn_spectrum(model, context, budget, config)


def _check_windows(config: SoCoConfig, samples: int, seqlen: int) -> None:
    """Enough training windows for one batch (as :func:`~.training.training_windows` cuts them) once the
    held-out windows are set aside."""
    held = max(1, math.ceil(config.held_out * samples)) if config.guard else 0
    if samples - held < 1:
        raise SvdkitError(
            f"method 'soco' holds out {held} of its {samples} calibration window(s) to guard against overfitting and "
            "needs at least one more to train on: pass more calibration samples"
        )
    length = min(config.seqlen, seqlen)
    count = (samples - held) * (seqlen // length)
    if count < config.batch:
        raise SvdkitError(
            f"method 'soco': batch={config.batch} needs {config.batch} training windows, but {samples} calibration "
            f"windows of {seqlen} tokens give {count} of {length} once {held} is held out: lower batch or pass more "
            "calibration samples"
        )


@register(
    "soco",
    SoCoConfig,
    requires=tuple(_STATISTICS),
    summary="learned singular-spectrum scores under a global budget (trains on the calibration windows)",
    paper="SoCo, singular spectrum optimization, 2025",
    training=MethodTraining(start_ranks=start_ranks, run=_run, check=_check_windows),
)
def soco(W: torch.Tensor, stats: LinearStats | None, rank: int, config: SoCoConfig) -> Factors:
    """The base method's factors at the start rank (the scores are learned later, on the whole model)."""
    base = get_method(config.base)
    return base.decompose(W, stats, rank, make_config(base))
