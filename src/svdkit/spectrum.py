"""SoCo's training: one learned score per singular component of every low-rank target, under a global
parameter budget (Singular spectrum optimization, 2025; the working spec is ../shared/METHODS.md).

Each target y = B (A x) + b of rank r becomes y = B (s * (A x)) + b with scores s (r, start at 1); only
the scores train, on next-token cross-entropy over the calibration windows. A kept component of an
m x n matrix costs c = m + n parameters; the *soft* kept count is K(s) = sum c * min(s, 1), so scores
above 1 cost nothing extra and can compensate for pruned neighbours. Three stages (svdkit's reading of
the paper, which publishes no code):

1. coarse: the count target falls linearly from the start count to the budget; after each Adam step
   on the cross-entropy the scores take the proximal step of the count penalty lam K(s), with the
   weakest lam >= 0 that meets the target (bisection; the budget sets the penalty, nothing is tuned).
   At beta = 1 this is the cost-weighted soft threshold s <- max(s - lam c / mean(c), 0) (an L1 penalty);
2. refine: the same at the budget itself, so scores trade places at a fixed count, while the count
   anneals toward the hard one: K_beta(s) = sum c * min(s / beta, 1) with beta falling geometrically
   from ``beta_start`` (1) to ``beta_min`` (0.02). The proximal step of this capped-L1 penalty (:func:`capped_prox`)
   moves from the soft threshold to the hard threshold of the L0 count, which zeroes the weakest scores
   and leaves the kept ones untouched. ``beta_start`` sets the coarse stage's beta (default 1);
3. final: prune to the exact budget, largest scores first (regardless of singular-value order; every
   matrix keeps at least its best component), then train the kept scores on the cross-entropy alone.

Status: on SmolLM2-135M at 0.4 no version of these stages beats svd-llm-v2 yet: whenever the count
moves from the soft (L1) to the hard one, the model, which relied on components at fractional scores,
breaks (docs/results/README.md, SoCo, records what was tried and measured).

The budget is the parameter count the allocation gives the targets at the target ratio (by default
the uniform one): the final count is at most the budget and within one component of it. The scores
are folded into the factors (sqrt(s) into each), leaving an ordinary low-rank model. Training needs the
whole model on one device; interrupting it raises KeyboardInterrupt with the model restored to its
start decomposition's layers, and a non-finite loss stops it with an SvdkitError.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .errors import SvdkitError
from .lowrank import LowRankLinear

__all__ = [
    "ScoredLinear",
    "capped_prox",
    "learn_spectrum",
    "project_budget",
    "prune_to_budget",
    "fold_scores",
    "soft_count",
]


class ScoredLinear(nn.Module):
    """y = B (s * (A x)) + b around a LowRankLinear; only ``score`` (float32) trains, pruned entries stay 0."""

    def __init__(self, low: LowRankLinear) -> None:
        super().__init__()
        self.low = low
        self.score = nn.Parameter(torch.ones(low.rank, device=low.A.device))
        self.register_buffer("mask", torch.ones(low.rank, dtype=torch.bool, device=low.A.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.low.A)
        return F.linear(h * (self.score * self.mask).to(h.dtype), self.low.B, self.low.bias)


def soft_count(scores: torch.Tensor, costs: torch.Tensor, beta: float = 1.0) -> float:
    """K(s) = sum c * min(s / beta, 1) (scores are kept >= 0); beta -> 0 approaches the hard count."""
    return float((costs * (scores / beta).clamp(0, 1)).sum())


def capped_prox(scores: torch.Tensor, costs: torch.Tensor, lam: float, beta: float = 1.0) -> torch.Tensor:
    """The proximal operator of lam * sum w min(s / beta, 1) (w = c / mean(c)) on s >= 0, per coordinate.

    Each score takes the better of two candidates: shrunk, x = clip(s - lam w / beta, 0, beta), paying
    the slope; or kept, x = max(s, beta), paying the cap lam w. At beta = 1 and s <= 1 it is the soft
    threshold (L1); as beta -> 0 it becomes the hard threshold of the L0 count (zero s where
    s^2 / 2 < lam w), leaving the kept scores untouched.
    """
    s = scores.clamp(min=0)
    w = costs / costs.mean()
    slope = lam * w / beta
    shrunk = (s - slope).clamp(0, beta)
    kept = s.clamp(min=beta)
    f_shrunk = 0.5 * (shrunk - s) ** 2 + slope * shrunk
    f_kept = 0.5 * (kept - s) ** 2 + lam * w
    return torch.where(f_shrunk <= f_kept, shrunk, kept)


def project_budget(
    scores: torch.Tensor, costs: torch.Tensor, target: float, iters: int = 50, beta: float = 1.0
) -> float:
    """In place: s <- capped_prox(s, lam, beta) with the smallest lam >= 0 giving K_beta(s) <= target; returns lam.

    The budget acts as the weight of the count penalty: bisection finds the weakest penalty whose
    proximal step meets it (the count is non-increasing in lam).
    """
    scores.clamp_(min=0)
    if soft_count(scores, costs, beta) <= target:
        return 0.0
    w = costs / costs.mean()
    lo, hi = 0.0, float((scores * scores.clamp(min=beta) / w).max()) + 1.0  # hi zeroes every score
    for _ in range(iters):
        mid = (lo + hi) / 2
        if soft_count(capped_prox(scores, costs, mid, beta), costs, beta) > target:
            lo = mid
        else:
            hi = mid
    scores.copy_(capped_prox(scores, costs, hi, beta))
    return hi


def prune_to_budget(scores: torch.Tensor, costs: torch.Tensor, owner: torch.Tensor, budget: float) -> torch.Tensor:
    """A keep-mask: every matrix's best component first, then the largest scores while their cost fits.

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
        if not keep[j] and spent + float(costs[j]) <= budget:
            keep[j] = True
            spent += float(costs[j])
    return keep


def fold_scores(scored: ScoredLinear) -> LowRankLinear:
    """The kept components with sqrt(s) folded into A and B (float64 arithmetic, the layer's dtype)."""
    low = scored.low
    keep = scored.mask.nonzero().flatten()
    root = scored.score.detach()[keep].double().clamp(min=0).sqrt()
    A = low.A.detach()[keep].double() * root[:, None]
    B = low.B.detach()[:, keep].double() * root[None, :]
    bias = low.bias.detach() if low.bias is not None else None
    return LowRankLinear.from_factors(A.to(low.A.dtype), B.to(low.A.dtype), bias)


def _cost(shape: tuple[int, int], rank: int | None) -> int:
    m, n = shape
    return m * n if rank is None else rank * (m + n)


def learn_spectrum(model: nn.Module, context: Any, budget_ranks: dict, config: Any) -> tuple[dict[str, int], dict]:
    """Train the scores of every low-rank target of `model` (SoCo's three stages), prune, fold.

    `budget_ranks` (the allocation at the target ratio) sets the budget; returns (final ranks by
    name, a report with the budget, the kept count, the time and the loss curve per step).
    """
    names = list(context.shapes)
    budget = float(sum(_cost(context.shapes[n], budget_ranks[n]) for n in names))
    device = context.device
    windows = context.windows
    if windows is None:
        raise SvdkitError("soco trains on calibration windows: none were given")
    seqlen = min(config.seqlen, windows.shape[-1])
    chunks = windows[:, : windows.shape[-1] // seqlen * seqlen].reshape(-1, seqlen)
    if len(chunks) < config.batch:
        raise SvdkitError(f"soco needs at least batch={config.batch} training windows of {seqlen}; got {len(chunks)}")

    home = next(model.parameters()).device
    frozen = {p: p.requires_grad for p in model.parameters()}
    scored: dict[str, ScoredLinear] = {}
    for name in names:
        low = model.get_submodule(name)
        if not isinstance(low, LowRankLinear):
            raise RuntimeError(f"soco expected a low-rank layer at {name}")
        scored[name] = ScoredLinear(low)
    costs = torch.cat(
        [
            torch.full((s.low.rank,), s.low.in_features + s.low.out_features, dtype=torch.float64)
            for s in scored.values()
        ]
    )
    owner = torch.cat([torch.full((s.low.rank,), i, dtype=torch.long) for i, s in enumerate(scored.values())])
    start = float(costs.sum())
    if budget >= start:
        raise SvdkitError(
            f"the target keeps {budget:,.0f} parameters in the targets but the start decomposition holds only "
            f"{start:,.0f}: SoCo can only prune; lower start_ratio (now {config.start_ratio}) below the target ratio"
        )
    min_need = sum(s.low.in_features + s.low.out_features for s in scored.values())
    if budget < min_need:
        raise SvdkitError(
            f"the budget of {budget:,.0f} parameters cannot keep even one component per matrix "
            f"({min_need:,} needed): choose a lower ratio"
        )

    steps = config.steps
    n_coarse = max(1, round(steps * config.coarse)) if config.coarse > 0 else 0
    n_refine = min(max(1, round(steps * config.refine)) if config.refine > 0 else 0, steps - n_coarse)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(chunks), generator=generator)
    dense_total = float(sum(m * n for m, n in context.shapes.values()))
    curve: list[dict] = []
    if torch.is_inference_mode_enabled():
        raise SvdkitError("soco trains scores with gradients: call compress outside torch.inference_mode()")
    try:
        log = Path(config.log).open("w") if config.log else None
    except OSError as e:
        raise SvdkitError(f"cannot write the soco log {config.log}: {e}") from e
    t0 = time.perf_counter()
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, s in scored.items():
            model.set_submodule(name, s)
        model.to(device)
        model.eval()  # no dropout; gradients still flow to the scores
        with torch.enable_grad():  # the caller may have turned gradients off
            params = [s.score for s in scored.values()]
            opt = torch.optim.Adam(params, lr=config.lr)
            bar = tqdm(range(steps), desc="soco", unit="step", disable=not context.progress)
            cursor, beta = 0, config.beta_start
            for step in bar:
                if step < n_coarse:
                    stage, target = "coarse", start + (budget - start) * (step + 1) / n_coarse
                elif step < n_coarse + n_refine:
                    stage, target = "refine", budget
                    done = (step - n_coarse + 1) / n_refine  # anneal the soft count toward the hard one
                    beta = config.beta_start * (config.beta_min / config.beta_start) ** done
                else:
                    stage, target = "final", budget
                    if step == n_coarse + n_refine:
                        _prune(scored, costs, owner, budget)
                idx = order[torch.arange(cursor, cursor + config.batch) % len(order)]
                cursor += config.batch
                ids = chunks[idx].to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise SvdkitError(
                        f"soco training diverged at step {step + 1} ({stage} stage): the loss is "
                        f"{float(loss.detach())}; lower lr (now {config.lr}); nothing was kept"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    flat = torch.cat([s.score.detach().cpu() for s in scored.values()]).double()
                    if stage != "final":
                        project_budget(flat, costs, target, beta=beta)
                    flat.clamp_(min=0)
                    mask = torch.cat([s.mask.cpu() for s in scored.values()])
                    flat *= mask
                    if not torch.isfinite(flat).all():
                        raise SvdkitError(
                            f"soco scores became non-finite at step {step + 1}: lower lr (now {config.lr})"
                        )
                    offset = 0
                    for s in scored.values():
                        s.score.copy_(flat[offset : offset + s.low.rank].to(s.score.device))
                        offset += s.low.rank
                kept = soft_count(flat, costs, beta) if stage != "final" else float((costs * mask).sum())
                row = {
                    "step": step + 1,
                    "stage": stage,
                    "loss": float(loss.detach()),
                    "kept": kept / dense_total,
                    "target": target / dense_total,
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                curve.append(row)
                if log is not None:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{row['loss']:.3f}", kept=f"{row['kept']:.3f}", stage=stage)
        if n_coarse + n_refine >= steps:  # no final steps: prune at the end
            _prune(scored, costs, owner, budget)
        final = {name: fold_scores(s) for name, s in scored.items()}
    except BaseException:
        for name, s in scored.items():  # back to the start decomposition's layers
            model.set_submodule(name, s.low)
        model.to(home)
        raise
    finally:
        if log is not None:
            log.close()
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    for name, low in final.items():
        low.requires_grad_(frozen[scored[name].low.A])
        model.set_submodule(name, low)
    model.to(home)
    ranks = {name: low.rank for name, low in final.items()}
    kept_params = sum(_cost(context.shapes[n], r) for n, r in ranks.items())
    report = {
        "budget": int(budget),
        "start": int(start),
        "kept": int(kept_params),
        "steps": steps,
        "seconds": round(time.perf_counter() - t0, 2),
        "final_loss": curve[-1]["loss"] if curve else None,
        "curve": curve,
    }
    return ranks, report


def _prune(scored: dict[str, ScoredLinear], costs: torch.Tensor, owner: torch.Tensor, budget: float) -> None:
    flat = torch.cat([s.score.detach().cpu() for s in scored.values()])
    keep = prune_to_budget(flat, costs, owner, budget)
    offset = 0
    with torch.no_grad():
        for s in scored.values():
            m = keep[offset : offset + s.low.rank].to(s.mask.device)
            s.mask.copy_(m)
            s.score.mul_(m)  # pruned scores stay 0: each step re-masks them (momentum cannot revive them)
            offset += s.low.rank
