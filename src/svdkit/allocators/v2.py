"""SVD-LLM V2's heterogeneous compression-ratio allocation (Wang et al. 2025, arXiv 2503.12340).

Matrices are grouped by type (every layer's q_proj, every k_proj, ...; same shape within a group).
Each matrix i gets its theoretical truncation loss at the target ratio R: with D_i = W_i S_i
(S_i S_i^T = G_i, the input Gram matrix) and k_i its rank at R, L_i = sqrt(sum_{j > k_i} s_j(D_i)^2),
the output error ||(W_i - W_i') X_i||_F that the best rank-k_i approximation leaves (per token).
Lossier matrices get a smaller ratio (more parameters); the group's mean ratio stays exactly R.

The paper's rule, L <- 1 / log(L), ratio_i = len(G) R L_i / sum(L), breaks for L <= 1 (log <= 0:
negative or infinite weights) and depends on the loss's units (a Gram sum or mean, the token count).
svdkit's robust monotone version (``v2``):

1. Make the losses scale-free and positive: z_i = log(L_i / min_G L) >= 0 (losses are floored at
   1e-12 max_G L, so a zero loss is fine). This is the paper's log applied to e L_i / min L.
2. Weights w_i = 1 / (1 + z_i) in (0, 1]: decreasing in L_i, 1 for the least lossy matrix, exactly
   the paper's 1 / log once the smallest normalized loss is e.
3. Raw ratios r_i = R (w_i / mean_G w)^strength (strength 0: uniform; 1: the rule above).
4. Clip to [min_ratio, max_ratio] and restore the group mean exactly: ratios r_i + t clipped, with
   the scalar shift t found by bisection so that mean_G clip(r_i + t) = R. Shifting keeps the order.

``rule="power"`` replaces step 2 by w_i = (L_i / geometric mean_G L)^-strength: the paper's 1 / log L
is locally such a power law with exponent 1 / ln L, which depends on the loss's units; here the
exponent is explicit. A negative strength reverses the direction (an ablation, not the paper's rule).

The default is the paper's rule, so that ``v2`` means SVD-LLM V2's allocation; the options make both
directions available (which one helps depends on the model: the measurements are in the project's docs).

Ratios become ranks with the uniform formula k = floor(m n (1 - r) / (m + n)) (at least 1); a matrix
whose ratio leaves no saving stays dense. Every group, hence the model, keeps the parameter budget
of uniform allocation (up to the same rank flooring).

Cost: one eigendecomposition per distinct Gram matrix and one singular-value computation per matrix
(less than the decomposition itself). They are computed as each layer is calibrated
(:func:`whitened_spectra`, the allocator's ``summarize``), and only the spectra are kept: min(m, n)
float64 values per matrix, so the statistics never need to be held or spilled; the factors come from a
second calibration pass.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..core.options import Options, choice, number, option
from ..core.ranks import rank_for_ratio, saves_parameters
from ..methods.linalg import eigen_whitening
from .base import AllocationContext, register_allocator

__all__ = [
    "V2AllocationConfig",
    "group_of",
    "whitened_spectra",
    "truncation_losses",
    "heterogeneous_ratios",
    "allocate_v2",
]


@dataclass
class V2AllocationConfig(Options):
    strength: float = option(
        1.0,
        "exponent on the loss weights: 0 gives uniform allocation, 1 the V2 rule, larger spreads more; negative "
        "reverses the direction (lossier matrices get higher ratios: an ablation)",
        number(-10, 10),
    )
    min_ratio: float = option(
        0.0, "no matrix keeps more than its dense size (ratio 0 means kept dense)", number(0, 1, hi_open=True)
    )
    max_ratio: float = option(
        0.9, "no matrix loses more than this fraction of its parameters", number(0, 1, hi_open=True)
    )
    rel_floor: float = option(
        1e-10,
        "eigenvalues of G at or below rel_floor * lambda_max count as unreached (as in svd-llm-v2)",
        number(0, 1, hi_open=True),
    )
    rule: str = option(
        "log",
        "'log': weights 1 / (1 + log(L / min L)); 'power': weights (L / geometric mean L)^-strength",
        choice("log", "power"),
    )
    loss: str = option(
        "absolute",
        "'absolute': the dropped whitened norm L; 'relative': L / ||W X|| (the share of the output lost)",
        choice("absolute", "relative"),
    )

    def check(self) -> None:
        if self.min_ratio > self.max_ratio:
            raise ValueError(f"min_ratio {self.min_ratio} is above max_ratio {self.max_ratio}")


def group_of(name: str, shape: tuple[int, int]) -> str:
    """The group key of a target: its name with the layer index removed, and its shape."""
    kind = re.sub(r"\.\d+\.", ".*.", name)
    return f"{kind} {shape[0]}x{shape[1]}"


@torch.no_grad()
def whitened_spectra(
    weights: Mapping[str, torch.Tensor],
    statistics: Mapping[str, Any],
    config: V2AllocationConfig,
    device=None,
    method=None,
    method_config=None,
) -> dict[str, torch.Tensor]:
    """V2's summary of one layer's targets: the singular values s(W_i S_i) (float64, on the CPU), with
    S_i S_i^T = G_i / T the input's mean Gram matrix; q/k/v (and gate/up) share one whitening. The method
    does not enter: V2 ranks the weights themselves."""
    dev = device or torch.device("cpu")
    spectra: dict[str, torch.Tensor] = {}
    last: tuple[torch.Tensor, torch.Tensor] | None = None
    for name, weight in weights.items():
        stats = statistics[name]
        if last is None or last[0] is not stats["gram"]:
            S_w, _ = eigen_whitening(stats.gram_mean.to(dev, torch.float64), config.rel_floor)
            last = (stats["gram"], S_w)
        spectra[name] = torch.linalg.svdvals(weight.detach().to(dev, torch.float64) @ last[1]).cpu()
    return spectra


def truncation_losses(
    spectra: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], ratio: float
) -> dict[str, tuple[float, float]]:
    """Per target (L_i, E_i): L_i = sqrt(sum_{j>k_i} s_j^2) with s its whitened singular values and k_i
    the rank at the uniform ratio; E_i = sqrt(sum_j s_j^2) = ||W_i X_i||_F / sqrt(T), the output's size."""
    losses: dict[str, tuple[float, float]] = {}
    for name, (m, n) in shapes.items():
        sv = spectra[name]
        losses[name] = (float(sv[rank_for_ratio(m, n, ratio) :].norm()), float(sv.norm()))
    return losses


def heterogeneous_ratios(
    losses: list[float],
    ratio: float,
    strength: float = 1.0,
    lo: float = 0.0,
    hi: float = 0.9,
    rule: str = "log",
) -> list[float]:
    """Per-matrix ratios of one group: decreasing in the loss, clipped to [lo, hi], mean exactly `ratio`.

    ``rule="log"``: weights 1 / (1 + log(L / min L)) raised to `strength`; ``rule="power"``: weights
    (L / geometric mean L)^-strength. Raw ratios are `ratio` times weight / mean weight.
    """
    if not losses:
        return []
    lo, hi = min(lo, ratio), max(hi, ratio)
    top = max(losses)
    if not top > 0:
        return [ratio] * len(losses)
    logs = [math.log(max(v, 1e-12 * top)) for v in losses]
    if rule == "log":
        w = [(1.0 / (1.0 + x - min(logs))) ** strength for x in logs]
    elif rule == "power":
        mean_log = sum(logs) / len(logs)
        w = [math.exp(-strength * (x - mean_log)) for x in logs]
    else:
        raise ValueError(f"unknown rule {rule!r}: use 'log' or 'power'")
    mean_w = sum(w) / len(w)
    raw = [ratio * x / mean_w for x in w]

    def mean_at(t: float) -> float:
        return sum(min(hi, max(lo, r + t)) for r in raw) / len(raw)

    a, b = lo - max(raw), hi - min(raw)  # mean_at(a) = lo <= ratio <= hi = mean_at(b)
    for _ in range(200):
        t = (a + b) / 2
        if mean_at(t) < ratio:
            a = t
        else:
            b = t
    t = (a + b) / 2
    return [min(hi, max(lo, r + t)) for r in raw]


@register_allocator(
    "v2",
    V2AllocationConfig,
    needs_statistics=True,
    requires=("gram",),
    summarize=whitened_spectra,
    summary="SVD-LLM V2: lossier matrices of each type get lower ratios, the type's mean ratio stays the target",
)
def allocate_v2(context: AllocationContext, config: V2AllocationConfig) -> dict[str, int | None]:
    losses = truncation_losses(context.summaries, context.shapes, context.ratio)
    groups: dict[str, list[str]] = {}
    for name, shape in context.shapes.items():
        groups.setdefault(group_of(name, shape), []).append(name)
    ranks: dict[str, int | None] = {}
    spread: dict[str, list[float]] = {}
    for key, names in groups.items():
        scores = [losses[n][0] / (losses[n][1] if config.loss == "relative" else 1.0) for n in names]
        ratios = heterogeneous_ratios(
            scores, context.ratio, config.strength, config.min_ratio, config.max_ratio, config.rule
        )
        spread[key] = [round(min(ratios), 4), round(max(ratios), 4)]
        for name, r in zip(names, ratios, strict=True):
            m, n = context.shapes[name]
            k = rank_for_ratio(m, n, r)
            ranks[name] = k if saves_parameters(m, n, k) else None
    context.report["ratio_range"] = spread
    return ranks
