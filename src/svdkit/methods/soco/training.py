"""SoCo's training: one learned score per singular component of every low-rank target, under a global
parameter budget (Singular spectrum optimization, 2025).

Each target y = B (A x) + b of rank r becomes y = B (s * (A x)) + b with scores s (r, start at 1); only
the scores train, with Adam, on next-token cross-entropy over the calibration windows. A kept component
of an m x n matrix costs c = m + n parameters. The count has two readings: the *hard* count (the cost of
the components still in play: in the mask, score above 0) and its L1 relaxation, the *soft* count
K(s) = sum c * min(s, 1), where scores above 1 cost nothing extra and can compensate for pruned ones.
Three phases (svdkit's reading of the paper, which publishes no code):

1. coarse: the soft count's target falls linearly from the start count to the budget. Its penalty
   lam * sum w min(s, 1) (w = c / mean(c)) enters the *gradient* (:func:`~.scored.penalty_grad`), scaled by a
   running root-mean-square of the cross-entropy's gradients, so the optimiser weighs the two per
   score: a score with curvature h settles at s = 1 - lam w / h, and the components whose loss per
   parameter is smallest fall to 0 first. lam follows the target by dual ascent (:func:`~.scored.dual_step`);
   nothing is tuned by hand per model. (A proximal step after Adam's, the first design, compared the
   penalty with Adam's per-score normalised steps instead and ranked the components by the sign
   consistency of their gradients, and failed.)
2. refine: the soft count's target stays at the budget while the hard count is brought down to it
   linearly, each step pruning the smallest scores (:func:`~.scored.prune_to_budget`), so the model is never
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
within the same parameter count (:func:`~.scored.align_keep`), and the final phase trains the rounded set. The scores
are folded into the factors (sqrt(s) into each), leaving an ordinary low-rank model. Training needs the
whole model on one device; interrupting it raises KeyboardInterrupt with the model restored to its
start decomposition's layers, and a non-finite loss stops it with an SvdkitError.

The schedule is :mod:`.schedule`, the wrapped model :mod:`.scored`; this module is the loop.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ...core.ranks import cost
from ...core.report import Report
from ...errors import SvdkitError
from ...heal.guard import Guard, cut_windows, split_windows, steps_for
from .outcome import training_report
from .schedule import Schedule
from .scored import ScoredModel, dual_step, penalty_grad, soft_count

if TYPE_CHECKING:  # the allocators import the methods: a type only
    from ...allocators.base import AllocationContext

__all__ = ["learn_spectrum", "soco_loss", "training_windows"]


def training_windows(windows: torch.Tensor | None, seqlen: int, batch: int) -> torch.Tensor:
    """The calibration windows cut into training windows of `seqlen` tokens (at least `batch` of them)."""
    if windows is None:
        raise SvdkitError("soco trains on calibration windows: none were given")
    chunks = cut_windows(windows, seqlen)
    seqlen = chunks.shape[-1]
    if len(chunks) < batch:
        raise SvdkitError(f"soco needs at least batch={batch} training windows of {seqlen}; got {len(chunks)}")
    return chunks


def _check_budget(scored: ScoredModel, budget: float, config: Any) -> None:
    if budget >= scored.start:
        raise SvdkitError(
            f"the target keeps {budget:,.0f} parameters in the targets but the start decomposition holds only "
            f"{scored.start:,.0f}: SoCo can only prune; lower start_ratio (now {config.start_ratio}) below the target "
            "ratio"
        )
    if budget < scored.min_need:
        raise SvdkitError(
            f"the budget of {budget:,.0f} parameters cannot keep even one component per matrix "
            f"({scored.min_need:,} needed): choose a lower ratio"
        )


def _open_log(path: str | None):
    try:
        return Path(path).open("w") if path else None
    except OSError as e:
        raise SvdkitError(f"cannot write the soco log {path}: {e}") from e


def learn_spectrum(
    model: nn.Module, context: AllocationContext, budget_ranks: dict, config: Any
) -> tuple[dict[str, int], Report]:
    """Train the scores of every low-rank target of `model` (SoCo's three phases), prune, fold.

    `context` gives the targets' shapes, the device, the calibration windows, the progress flag and the
    rank multiple; `budget_ranks` (the allocation at the target ratio) sets the budget. The last windows
    are held out (:func:`~svdkit.heal.guard.split_windows`): the final phase keeps its best step on them,
    and where the start decomposition cut to the budget's ranks (for a nested base such as svd-llm-v2, the
    closed form at those ranks) is better there, that is the result. Returns (final ranks by name, a report
    with the budget, the kept count, the time, the held-out losses and the loss curve per step).
    """
    shapes = context.shapes
    budget = float(sum(cost(shapes[n], budget_ranks[n]) for n in shapes))
    train, held = split_windows(context.windows, config.held_out, "soco") if config.guard else (context.windows, None)
    chunks = training_windows(train, config.seqlen, config.batch)
    held = training_windows(held, config.seqlen, 1)[: config.eval_windows] if held is not None else None
    if config.steps == 0:
        config = dataclasses.replace(
            config, steps=steps_for(config.epochs, len(chunks), config.batch, config.max_steps)
        )
    scored = ScoredModel(model, list(shapes))
    _check_budget(scored, budget, config)
    if torch.is_inference_mode_enabled():
        raise SvdkitError("soco trains scores with gradients: call compress outside torch.inference_mode()")
    log = _open_log(config.log)
    home = next(model.parameters()).device
    frozen = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    t0 = time.perf_counter()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        scored.install(model)
        model.to(context.device)
        model.eval()  # no dropout; gradients still flow to the scores
        with torch.enable_grad():  # the caller may have turned gradients off
            dense_total = float(sum(m * n for m, n in shapes.values()))
            multiple = getattr(context, "rank_multiple", 1)
            trainer = _Trainer(model, scored, chunks, config, budget, dense_total, multiple, context.device)
            trainer.held = held
            curve = trainer.train(log, context.progress, t0)
        if trainer.schedule.final_start >= config.steps:  # no final steps: prune at the end
            scored.prune(budget, multiple=trainer.multiple)
        guard = _settle(trainer, budget_ranks) if held is not None else {}
        final = scored.folded()
    except BaseException:
        scored.uninstall(model)  # back to the start decomposition's layers
        model.to(home)
        raise
    finally:
        if log is not None:
            log.close()
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    for name, low in final.items():
        low.requires_grad_(frozen[scored.scored[name].low.A])
        model.set_submodule(name, low)
    model.to(home)
    ranks = {name: low.rank for name, low in final.items()}
    return ranks, training_report(config, curve, guard, int(budget), int(scored.start), ranks, shapes, len(chunks), t0)


def held_out_loss(model: nn.Module, held: torch.Tensor, device) -> float:
    """Mean next-token cross-entropy of `model` on the held-out windows."""
    with torch.no_grad():
        return sum(
            float(model(input_ids=ids[None].to(device), labels=ids[None].to(device)).loss) for ids in held
        ) / len(held)


@torch.no_grad()
def _settle(trainer: _Trainer, budget_ranks: dict) -> dict[str, Any]:
    """The final phase's best step is in place (its guard); keep it, or the start decomposition cut to the
    budget's ranks where that has the lower held-out loss. Returns the held-out part of the report."""
    scored, held = trainer.scored, trainer.held
    trained = held_out_loss(trainer.model, held, trainer.device)
    kept = {name: (s.score.detach().clone(), s.mask.clone()) for name, s in scored.scored.items()}
    for name, s in scored.scored.items():
        rank = min(s.low.rank, budget_ranks.get(name) or s.low.rank)
        s.mask.copy_(torch.arange(s.low.rank, device=s.mask.device) < rank)
        s.score.copy_(s.mask.to(s.score.dtype))
    closed = held_out_loss(trainer.model, held, trainer.device)
    fallback = closed < trained
    if not fallback:
        for name, s in scored.scored.items():
            s.score.copy_(kept[name][0])
            s.mask.copy_(kept[name][1])
    report = {"held_out_closed_form": closed, "held_out_trained": trained, "fell_back": fallback}
    if trainer.guard_report:
        report["final_phase"] = {k: v for k, v in trainer.guard_report.items() if k != "held_out_curve"}
        report["held_out_curve"] = trainer.guard_report["held_out_curve"]
    return report


class _Trainer:
    """The training loop's state: the optimiser, the penalty weight (lam), the gradients' running size."""

    def __init__(self, model, scored: ScoredModel, chunks, config, budget, dense_total, multiple, device) -> None:
        self.model, self.scored, self.chunks, self.config = model, scored, chunks, config
        self.budget, self.dense_total, self.multiple, self.device = budget, dense_total, multiple, device
        self.schedule = Schedule.of(config)
        self.order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(config.seed))
        self.opt = torch.optim.Adam(scored.scores(), lr=config.lr)
        self.cursor, self.lam, self.square = 0, 0.0, 0.0
        self.hard_from, self.hard = scored.start, scored.start
        self.held: torch.Tensor | None = None
        """held-out windows: the final phase keeps its best step on them"""
        self.guard: Guard | None = None
        self.guard_report: dict = {}

    def train(self, log, progress: bool, t0: float) -> list[dict]:
        curve: list[dict] = []
        bar = tqdm(range(self.config.steps), desc="soco", unit="step", disable=not progress)
        for step in bar:
            row = self.step(step)
            row["seconds"] = round(time.perf_counter() - t0, 3)
            curve.append(row)
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{row['loss']:.3f}", kept=f"{row['kept']:.3f}", phase=row["phase"])
            if self._guarded(step):
                break
        if self.guard is not None:
            self.guard_report = self.guard.finish(len(curve) - self.schedule.final_start)
        return curve

    def _guarded(self, step: int) -> bool:
        """Final phase: measure the held-out loss at its start and every `every` steps; True: stop early."""
        final = self.schedule.final_start  # the refine phase's last step cuts the mask (without one: the first)
        mask_final = step + 1 == final if self.schedule.n_refine > 0 else step == final
        if self.held is None or (self.guard is None and not mask_final):
            return False
        if self.guard is None:  # from here only the kept scores move
            self.guard = Guard(self.scored.scores(), self._held_out, self.config.every, patience=3)
            if step + 1 == final:
                return False
        return self.guard.check(step + 1 - final, last=step + 1 == self.config.steps)

    def _held_out(self) -> float:
        return held_out_loss(self.model, self.held, self.device)

    def step(self, step: int) -> dict:
        """One training step: targets, the loss and its gradient, the penalty, Adam, pruning; the curve's row."""
        schedule, scored = self.schedule, self.scored
        phase = schedule.phase(step)
        target = schedule.soft_target(step, scored.start, self.budget)
        self._prepare(step, phase)
        loss = self._loss_and_grad(step, phase)
        self._penalise(step, phase)
        self.opt.step()
        soft = self._after_step(step, phase, target)
        return {
            "step": step + 1,
            "phase": phase,
            "objective": self.config.loss,
            "loss": float(loss.detach()),
            "kept": scored.hard_count() / self.dense_total,
            "soft": soft / self.dense_total,
            "target": target / self.dense_total,
            "penalty": self.lam,
            "lr": self.opt.param_groups[0]["lr"],
        }

    def _prepare(self, step: int, phase: str) -> None:
        """Phase bookkeeping before the step: the refine phase's hard target, the final phase's lr and cut."""
        schedule = self.schedule
        if phase == "refine":
            if step == schedule.n_coarse:
                self.hard_from = self.scored.hard_count()
            self.hard = schedule.hard_target(step, self.hard_from, self.budget)
        elif phase == "final":
            if self.config.anneal:  # a fixed objective from here: the step falls linearly toward 0
                for group in self.opt.param_groups:
                    group["lr"] = schedule.learning_rate(step)
            if step == schedule.final_start and schedule.n_refine == 0:
                self.scored.prune(self.budget, multiple=self.multiple)

    def _loss_and_grad(self, step: int, phase: str) -> torch.Tensor:
        idx = self.order[torch.arange(self.cursor, self.cursor + self.config.batch) % len(self.order)]
        self.cursor += self.config.batch
        ids = self.chunks[idx].to(self.device)
        loss = soco_loss(self.model, self.scored, ids, self.config.loss)
        if not torch.isfinite(loss):
            raise SvdkitError(
                f"soco training diverged at step {step + 1} ({phase} phase): the loss is "
                f"{float(loss.detach())}; lower lr (now {self.config.lr}); nothing was kept"
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    @torch.no_grad()
    def _penalise(self, step: int, phase: str) -> None:
        """Add the count penalty to the gradients, in units of the gradients' running size."""
        grad = self.scored.flat(lambda s: s.score.grad).double()
        self.square = 0.9 * self.square + 0.1 * float(grad.square().mean())
        scale = (self.square / (1 - 0.9 ** (step + 1))) ** 0.5
        if phase != "final" and self.lam > 0:
            flat = self.scored.flat(lambda s: s.score).double()
            self.scored.add_to_grad(penalty_grad(flat, self.scored.costs, self.lam * scale))

    @torch.no_grad()
    def _after_step(self, step: int, phase: str, target: float) -> float:
        """Clamp, prune in the refine phase, check, and move the penalty's weight; returns the soft count."""
        scored = self.scored
        scored.clamp()
        last = step == self.schedule.final_start - 1  # the mask itself must fit: zeros in it could revive
        if phase == "refine" and (last or scored.hard_count() > self.hard):
            scored.prune(self.hard, fill=last, multiple=self.multiple)
        flat = scored.flat(lambda s: s.score).double()
        if not torch.isfinite(flat).all():
            raise SvdkitError(f"soco scores became non-finite at step {step + 1}: lower lr (now {self.config.lr})")
        soft = soft_count(flat, scored.costs)
        span = scored.start - self.budget
        self.lam = dual_step(self.lam, soft, target, span, self.config.penalty_lr) if phase != "final" else 0.0
        return soft


def soco_loss(model: nn.Module, scored: ScoredModel, ids: torch.Tensor, kind: str) -> torch.Tensor:
    """Next-token cross-entropy on `ids` ("ce"), or ("kd") the KL divergence of the model's next-token
    distributions from those of the start decomposition (every component, scores 1) on the same ids."""
    if kind == "ce":
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    with torch.no_grad():
        for s in scored.scored.values():
            s.start = True
        try:
            teacher = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        finally:
            for s in scored.scored.values():
                s.start = False
    student = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    vocab = student.shape[-1]
    return F.kl_div(student.reshape(-1, vocab), teacher.reshape(-1, vocab), log_target=True, reduction="batchmean")
