"""SoCo's training: one learned score per singular component of every low-rank target, under a global
parameter budget (Singular spectrum optimization, 2025; the working spec is ../shared/METHODS.md).

Each target y = B (A x) + b of rank r becomes y = B (s * (A x)) + b with scores s (r, start at 1); only
the scores train, with Adam, on next-token cross-entropy over the calibration windows. A kept component
of an m x n matrix costs c = m + n parameters. The count has two readings: the *hard* count (the cost of
the components still in play: in the mask, score above 0) and its L1 relaxation, the *soft* count
K(s) = sum c * min(s, 1), where scores above 1 cost nothing extra and can compensate for pruned ones.
Three stages (svdkit's reading of the paper, which publishes no code):

1. coarse: the soft count's target falls linearly from the start count to the budget. Its penalty
   lam * sum w min(s, 1) (w = c / mean(c)) enters the *gradient* (:func:`penalty_grad`), scaled by a
   running root-mean-square of the cross-entropy's gradients, so the optimiser weighs the two per
   score: a score with curvature h settles at s = 1 - lam w / h, and the components whose loss per
   parameter is smallest fall to 0 first. lam follows the target by dual ascent (:func:`dual_step`);
   nothing is tuned by hand per model. (A proximal step after Adam's, the first design, compared the
   penalty with Adam's per-score normalised steps instead and ranked the components by the sign
   consistency of their gradients; docs/results/README.md records how that failed.)
2. refine: the soft count's target stays at the budget while the hard count is brought down to it
   linearly, each step pruning the smallest scores (:func:`prune_to_budget`), so the model is never
   cut by more than a small step at once and the scores keep adapting to what has been removed; its
   last step cuts the mask itself to the budget (scores at 0 are kept only to fill what is left);
3. final: at the exact budget, the kept scores train on the cross-entropy alone (free to exceed 1).

Option ``loss="kd"`` (svdkit's addition, not the paper's) replaces the cross-entropy by the KL
divergence of the model's next-token distributions from the start decomposition's on the same
window (a no-grad teacher forward per step, every component at score 1); the curve records which
objective its ``loss`` column holds.

The budget is the parameter count the allocation gives the targets at the target ratio (by default
the uniform one): the final count is at most the budget and within one component of it; with a rank
multiple (the pipeline's ``rank_multiple``), the final cut then rounds every matrix's count to it
within the same parameter count (:func:`align_keep`), and the final stage trains the rounded set. The scores
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

from ...core.lowrank import LowRankLinear
from ...core.ranks import align_ranks
from ...errors import SvdkitError

__all__ = [
    "ScoredLinear",
    "align_keep",
    "dual_step",
    "learn_spectrum",
    "penalty_grad",
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

    The counts are rounded by :func:`~svdkit.allocation.align_ranks` (`shapes`: (m, n) by owner), never
    above a matrix's components; a matrix then keeps its best components: those already kept by score,
    then the others by score (-1: pruned earlier), ties by position. A count that goes up may so bring
    back components pruned earlier, with score 0: the final stage trains them like the others.
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


def _cost(shape: tuple[int, int], rank: int | None) -> int:
    m, n = shape
    return m * n if rank is None else rank * (m + n)


def learn_spectrum(model: nn.Module, context: Any, budget_ranks: dict, config: Any) -> tuple[dict[str, int], dict]:
    """Train the scores of every low-rank target of `model` (SoCo's three stages), prune, fold.

    `budget_ranks` (the allocation at the target ratio) sets the budget; returns (final ranks by
    name, a report with the budget, the kept count, the time and the loss curve per step).
    """
    names = list(context.shapes)
    multiple = getattr(context, "rank_multiple", 1)
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
            cursor, lam, square, hard_from = 0, 0.0, 0.0, start
            for step in bar:
                if step < n_coarse:
                    stage, target = "coarse", start + (budget - start) * (step + 1) / n_coarse
                elif step < n_coarse + n_refine:
                    stage, target = "refine", budget
                    if step == n_coarse:
                        hard_from = _hard_count(scored, costs)
                    hard = hard_from + (budget - hard_from) * (step - n_coarse + 1) / n_refine
                else:
                    stage, target = "final", budget
                    if config.anneal:  # a fixed objective from here: the step falls linearly toward 0
                        left = (steps - step) / (steps - n_coarse - n_refine)
                        for group in opt.param_groups:
                            group["lr"] = config.lr * left
                    if step == n_coarse + n_refine and n_refine == 0:
                        _prune(scored, costs, owner, budget, multiple=multiple)
                idx = order[torch.arange(cursor, cursor + config.batch) % len(order)]
                cursor += config.batch
                ids = chunks[idx].to(device)
                loss = _loss(model, scored, ids, config.loss)
                if not torch.isfinite(loss):
                    raise SvdkitError(
                        f"soco training diverged at step {step + 1} ({stage} stage): the loss is "
                        f"{float(loss.detach())}; lower lr (now {config.lr}); nothing was kept"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    grad = _flat(scored, lambda s: s.score.grad).double()
                    square = 0.9 * square + 0.1 * float(grad.square().mean())
                    scale = (square / (1 - 0.9 ** (step + 1))) ** 0.5
                    if stage != "final" and lam > 0:  # the count penalty, in units of the gradients' size
                        flat = _flat(scored, lambda s: s.score).double()
                        extra = penalty_grad(flat, costs, lam * scale)
                        offset = 0
                        for s in scored.values():
                            more = extra[offset : offset + s.low.rank].to(s.score.device, s.score.dtype)
                            s.score.grad += more * s.mask
                            offset += s.low.rank
                opt.step()
                with torch.no_grad():
                    for s in scored.values():
                        s.score.clamp_(min=0).mul_(s.mask)
                    last = step == n_coarse + n_refine - 1  # the mask itself must fit: zeros in it could revive
                    if stage == "refine" and (last or _hard_count(scored, costs) > hard):
                        _prune(scored, costs, owner, hard, fill=last, multiple=multiple)
                    flat = _flat(scored, lambda s: s.score).double()
                    if not torch.isfinite(flat).all():
                        raise SvdkitError(
                            f"soco scores became non-finite at step {step + 1}: lower lr (now {config.lr})"
                        )
                    soft = soft_count(flat, costs)
                    lam = dual_step(lam, soft, target, start - budget, config.penalty_lr) if stage != "final" else 0.0
                kept = _hard_count(scored, costs)
                row = {
                    "step": step + 1,
                    "stage": stage,
                    "objective": config.loss,
                    "loss": float(loss.detach()),
                    "kept": kept / dense_total,
                    "soft": soft / dense_total,
                    "target": target / dense_total,
                    "penalty": lam,
                    "lr": opt.param_groups[0]["lr"],
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                curve.append(row)
                if log is not None:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{row['loss']:.3f}", kept=f"{row['kept']:.3f}", stage=stage)
        if n_coarse + n_refine >= steps:  # no final steps: prune at the end
            _prune(scored, costs, owner, budget, multiple=multiple)
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
        "objective": config.loss,
        "seconds": round(time.perf_counter() - t0, 2),
        "final_loss": curve[-1]["loss"] if curve else None,
        "curve": curve,
    }
    return ranks, report


def _loss(model: nn.Module, scored: dict[str, ScoredLinear], ids: torch.Tensor, kind: str) -> torch.Tensor:
    """Next-token cross-entropy on `ids` ("ce"), or ("kd") the KL divergence of the model's next-token
    distributions from those of the start decomposition (every component, scores 1) on the same ids."""
    if kind == "ce":
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    with torch.no_grad():
        for s in scored.values():
            s.start = True
        try:
            teacher = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        finally:
            for s in scored.values():
                s.start = False
    student = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    vocab = student.shape[-1]
    return F.kl_div(student.reshape(-1, vocab), teacher.reshape(-1, vocab), log_target=True, reduction="batchmean")


def _flat(scored: dict[str, ScoredLinear], part) -> torch.Tensor:
    """`part(layer)` of every scored layer, detached, on the CPU, end to end in model order."""
    return torch.cat([part(s).detach().cpu() for s in scored.values()])


def _hard_count(scored: dict[str, ScoredLinear], costs: torch.Tensor) -> float:
    """The parameters of the components still in play (in the mask, score above 0)."""
    alive = _flat(scored, lambda s: s.mask & (s.score > 0))
    return float(costs[alive].sum())


def _prune(
    scored: dict[str, ScoredLinear],
    costs: torch.Tensor,
    owner: torch.Tensor,
    budget: float,
    fill: bool = True,
    multiple: int = 1,
) -> None:
    """Cut the masks to `budget` (:func:`prune_to_budget`); the final cut (`fill`) also aligns the ranks."""
    flat = _flat(scored, lambda s: s.score)
    alive = _flat(scored, lambda s: s.mask)  # pruned ones stay out
    if not fill:  # zero scores out too; else they fill what the budget has left, last
        alive &= flat > 0
    ranked = torch.where(alive, flat, -1.0)
    keep = prune_to_budget(ranked, costs, owner, budget)
    if fill and multiple > 1:
        shapes = [(x.low.out_features, x.low.in_features) for x in scored.values()]
        keep = align_keep(keep, ranked, owner, shapes, multiple)
    offset = 0
    with torch.no_grad():
        for s in scored.values():
            m = keep[offset : offset + s.low.rank].to(s.mask.device)
            s.mask.copy_(m)
            s.score.mul_(m)  # pruned scores stay 0: each step re-masks them (momentum cannot revive them)
            offset += s.low.rank
