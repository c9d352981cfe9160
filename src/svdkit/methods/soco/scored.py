"""The scored model: every low-rank target wrapped so that one score per component scales it.

:class:`ScoredLinear` computes y = B (s * (A x)) + b around a :class:`LowRankLinear`; :class:`ScoredModel`
holds the wrapped targets of a model with each component's parameter cost (m + n) and owner (its
matrix), puts them into the model and takes them out again (on error: the start decomposition's
layers; on success: the kept components with the scores folded in). The functions here are the math
of the scores: the soft count, the count penalty's gradient and its dual step, and pruning to a budget.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ...core.lowrank import LowRankLinear
from ...core.ranks import align_ranks
from ...errors import SvdkitError

__all__ = [
    "ScoredLinear",
    "ScoredModel",
    "align_keep",
    "dual_step",
    "fold_scores",
    "penalty_grad",
    "prune_to_budget",
    "soft_count",
]


class ScoredLinear(nn.Module):
    """y = B (s * (A x)) + b around a LowRankLinear; only ``score`` (float32) trains, pruned entries stay 0."""

    def __init__(self, low: LowRankLinear) -> None:
        super().__init__()
        self.low = low
        self.score = nn.Parameter(torch.ones(low.rank, device=low.A.device))
        self.register_buffer("mask", torch.ones(low.rank, dtype=torch.bool, device=low.A.device))
        self.start = False
        """True: compute the start decomposition's layer (every component, scores 1): the kd teacher"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.start:
            return self.low(x)
        h = F.linear(x, self.low.A)
        return F.linear(h * (self.score * self.mask).to(h.dtype), self.low.B, self.low.bias)


def soft_count(scores: torch.Tensor, costs: torch.Tensor) -> float:
    """K(s) = sum c * min(s, 1) (scores are kept >= 0): the L1 relaxation of the kept count."""
    return float((costs * scores.clamp(0, 1)).sum())


def penalty_grad(scores: torch.Tensor, costs: torch.Tensor, lam: float) -> torch.Tensor:
    """A gradient of lam * sum w min(s, 1) with w = c / mean(c): lam w up to 1, 0 above.

    At s = 1 it takes the subgradient that pulls down: untrained scores start there.

    Added to the cross-entropy's gradient before the optimiser's step, so the stationary point of a
    score with curvature h is s = 1 - lam w / h: a component is dropped (s -> 0) where the loss it
    holds per parameter, h / w, is below lam.
    """
    return lam * (costs / costs.mean()) * (scores <= 1).to(costs.dtype)


def dual_step(lam: float, soft: float, target: float, span: float, rate: float) -> float:
    """Dual ascent on the penalty's weight: lam grows while the soft count is above target (never below 0)."""
    return max(0.0, lam + rate * (soft - target) / span)


def prune_to_budget(scores: torch.Tensor, costs: torch.Tensor, owner: torch.Tensor, budget: float) -> torch.Tensor:
    """A keep-mask: every matrix's best component first, then the largest scores while their cost fits.

    Negative scores mark components out of play: never kept, except as a matrix's only component.

    `owner` gives each component's matrix index (components of a matrix are contiguous, in singular-value
    order). Equal scores go by position inside their matrix, so untrained scores (all 1) keep every
    matrix's leading components alike rather than whole matrices in model order.
    """
    index = torch.arange(len(scores))
    first_of = {}
    for j, o in enumerate(owner.tolist()):
        first_of.setdefault(o, j)
    position = index - torch.tensor([first_of[o] for o in owner.tolist()], dtype=torch.long)
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), int(position[j])))
    keep = torch.zeros(len(scores), dtype=torch.bool)
    first = torch.zeros(int(owner.max()) + 1, dtype=torch.bool)
    spent = 0.0
    for j in order:  # each matrix's best-scored component
        o = int(owner[j])
        if not first[o]:
            first[o] = True
            keep[j] = True
            spent += float(costs[j])
    if spent > budget:
        raise SvdkitError(
            f"the budget of {budget:,.0f} parameters cannot keep even one component per matrix "
            f"({spent:,.0f} needed): choose a lower ratio"
        )
    for j in order:
        if not keep[j] and float(scores[j]) >= 0 and spent + float(costs[j]) <= budget:
            keep[j] = True
            spent += float(costs[j])
    return keep


def align_keep(
    keep: torch.Tensor, scores: torch.Tensor, owner: torch.Tensor, shapes: list[tuple[int, int]], multiple: int
) -> torch.Tensor:
    """The keep-mask with every matrix's count rounded to a multiple of `multiple` within its cost.

    The counts are rounded by :func:`~svdkit.core.ranks.align_ranks` (`shapes`: (m, n) by owner), never
    above a matrix's components; a matrix then keeps its best components: those already kept by score,
    then the others by score (-1: pruned earlier), ties by position. A count that goes up may so bring
    back components pruned earlier, with score 0: the final phase trains them like the others.
    """
    counts = torch.bincount(owner[keep], minlength=len(shapes)).tolist()
    sizes = torch.bincount(owner, minlength=len(shapes)).tolist()
    aligned = align_ranks(dict(enumerate(counts)), dict(enumerate(shapes)), multiple, limits=dict(enumerate(sizes)))
    out = torch.zeros_like(keep)
    for o, k in aligned.items():
        idx = (owner == o).nonzero().flatten().tolist()
        order = sorted(idx, key=lambda j: (not bool(keep[j]), -float(scores[j]), j))
        out[order[:k]] = True
    return out


def fold_scores(scored: ScoredLinear) -> LowRankLinear:
    """The kept components with sqrt(s) folded into A and B (float64 arithmetic, the layer's dtype)."""
    low = scored.low
    keep = scored.mask.nonzero().flatten()
    root = scored.score.detach()[keep].double().clamp(min=0).sqrt()
    A = low.A.detach()[keep].double() * root[:, None]
    B = low.B.detach()[:, keep].double() * root[None, :]
    bias = low.bias.detach() if low.bias is not None else None
    return LowRankLinear.from_factors(A.to(low.A.dtype), B.to(low.A.dtype), bias)


class ScoredModel:
    """The low-rank targets of a model, each wrapped in a :class:`ScoredLinear`, as one flat vector of components.

    `costs` holds each component's parameter cost (m + n of its matrix) and `owner` its matrix's index,
    in model order; :attr:`start` is the cost of all of them (the start decomposition's count).
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.scored: dict[str, ScoredLinear] = {}
        for name in names:
            low = model.get_submodule(name)
            if not isinstance(low, LowRankLinear):
                raise RuntimeError(f"soco expected a low-rank layer at {name}")
            self.scored[name] = ScoredLinear(low)
        layers = list(self.scored.values())
        self.costs = torch.cat(
            [torch.full((s.low.rank,), s.low.in_features + s.low.out_features, dtype=torch.float64) for s in layers]
        )
        self.owner = torch.cat([torch.full((s.low.rank,), i, dtype=torch.long) for i, s in enumerate(layers)])
        self.start = float(self.costs.sum())
        self.min_need = sum(s.low.in_features + s.low.out_features for s in layers)

    def install(self, model: nn.Module) -> None:
        """Put the scored layers into `model` in place of the low-rank targets."""
        for name, s in self.scored.items():
            model.set_submodule(name, s)

    def uninstall(self, model: nn.Module) -> None:
        """Put the start decomposition's low-rank layers back."""
        for name, s in self.scored.items():
            model.set_submodule(name, s.low)

    def scores(self) -> list[torch.Tensor]:
        return [s.score for s in self.scored.values()]

    def flat(self, part: Callable[[ScoredLinear], torch.Tensor]) -> torch.Tensor:
        """`part(layer)` of every scored layer, detached, on the CPU, end to end in model order."""
        return torch.cat([part(s).detach().cpu() for s in self.scored.values()])

    def hard_count(self) -> float:
        """The parameters of the components still in play (in the mask, score above 0)."""
        alive = self.flat(lambda s: s.mask & (s.score > 0))
        return float(self.costs[alive].sum())

    def add_to_grad(self, extra: torch.Tensor) -> None:
        """Add a flat vector to the scores' gradients (masked: pruned components get none)."""
        offset = 0
        for s in self.scored.values():
            more = extra[offset : offset + s.low.rank].to(s.score.device, s.score.dtype)
            s.score.grad += more * s.mask
            offset += s.low.rank

    def clamp(self) -> None:
        """Scores are kept >= 0, and pruned ones at 0."""
        for s in self.scored.values():
            s.score.clamp_(min=0).mul_(s.mask)

    def prune(self, budget: float, fill: bool = True, multiple: int = 1) -> None:
        """Cut the masks to `budget` (:func:`prune_to_budget`); the final cut (`fill`) also aligns the ranks."""
        flat = self.flat(lambda s: s.score)
        alive = self.flat(lambda s: s.mask)  # pruned ones stay out
        if not fill:  # zero scores out too; else they fill what the budget has left, last
            alive &= flat > 0
        ranked = torch.where(alive, flat, -1.0)
        keep = prune_to_budget(ranked, self.costs, self.owner, budget)
        if fill and multiple > 1:
            shapes = [(x.low.out_features, x.low.in_features) for x in self.scored.values()]
            keep = align_keep(keep, ranked, self.owner, shapes, multiple)
        offset = 0
        with torch.no_grad():
            for s in self.scored.values():
                m = keep[offset : offset + s.low.rank].to(s.mask.device)
                s.mask.copy_(m)
                s.score.mul_(m)  # pruned scores stay 0: each step re-masks them (momentum cannot revive them)
                offset += s.low.rank

    def folded(self) -> dict[str, LowRankLinear]:
        """Every target's kept components with its scores folded in, by name."""
        return {name: fold_scores(s) for name, s in self.scored.items()}
