"""SoCo's schedule, a pure function of the step: the phase, the count targets and the learning rate.

Of `steps` steps, the first ``round(steps * coarse)`` are the coarse phase (the soft count's target
falls linearly from the start count to the budget), the next ``round(steps * refine)`` the refine phase
(the hard count's target falls linearly from where it stood to the budget) and the rest the final
phase (the learning rate falls linearly to 0 when annealed). A share above 0 gives its phase at least
one step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Schedule"]


@dataclass(frozen=True)
class Schedule:
    steps: int
    n_coarse: int
    n_refine: int
    lr: float
    anneal: bool

    @classmethod
    def of(cls, config: Any) -> Schedule:
        """The schedule of a :class:`~svdkit.methods.soco.SoCoConfig`."""
        steps = config.steps
        n_coarse = max(1, round(steps * config.coarse)) if config.coarse > 0 else 0
        n_refine = min(max(1, round(steps * config.refine)) if config.refine > 0 else 0, steps - n_coarse)
        return cls(steps, n_coarse, n_refine, config.lr, config.anneal)

    @property
    def final_start(self) -> int:
        """The first step of the final phase (== steps when there is none)."""
        return self.n_coarse + self.n_refine

    def phase(self, step: int) -> str:
        if step < self.n_coarse:
            return "coarse"
        return "refine" if step < self.final_start else "final"

    def soft_target(self, step: int, start: float, budget: float) -> float:
        """The soft count's target after `step`: down from `start` to `budget` over the coarse phase."""
        if step < self.n_coarse:
            return start + (budget - start) * (step + 1) / self.n_coarse
        return budget

    def hard_target(self, step: int, hard_from: float, budget: float) -> float:
        """The hard count's target after refine step `step`: down from `hard_from` (where it stood) to `budget`."""
        return hard_from + (budget - hard_from) * (step - self.n_coarse + 1) / self.n_refine

    def learning_rate(self, step: int) -> float:
        """lr, falling linearly toward 0 over the final phase when annealed (a fixed objective from there)."""
        if self.anneal and step >= self.final_start:
            return self.lr * ((self.steps - step) / (self.steps - self.final_start))
        return self.lr
