"""The held-out guard every training stage runs under (SoCo's scores and the healers alike).

Training on a few calibration windows overfits quietly: 240 SoCo steps over 8 windows of 512 tokens are 30
epochs. A guarded stage therefore trains on part of the windows only (:func:`split_windows`), measures a
held-out loss before its first step (the closed form it starts from) and every few steps after it, keeps
the parameters of the best measurement, stops once the held-out loss has not improved for `patience`
measurements, and ends with the best parameters (:class:`Guard`): it never returns a model whose held-out
loss is worse than the one it started from. Its steps default to a number of epochs over the training
windows, with a cap (:func:`steps_for`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..errors import SvdkitError

__all__ = ["Guard", "cut_windows", "split_windows", "steps_for"]


def split_windows(windows: torch.Tensor, held_out: float, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) windows: the last ``ceil(held_out * n)`` of the n windows (at least one) held out."""
    n = len(windows)
    k = max(1, math.ceil(held_out * n))
    if n - k < 1:
        raise SvdkitError(
            f"{what} holds out {k} of its {n} calibration window(s) to guard against overfitting and needs at least "
            "one more to train on: give more calibration windows (--calib-samples)"
        )
    return windows[: n - k], windows[n - k :]


def cut_windows(windows: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Windows (n x L) cut into rows of min(seqlen, L) tokens (a window's tail shorter than that is dropped)."""
    seqlen = min(seqlen, windows.shape[-1])
    return windows[:, : windows.shape[-1] // seqlen * seqlen].reshape(-1, seqlen)


def steps_for(epochs: float, windows: int, batch: int, cap: int) -> int:
    """Steps that pass `epochs` times over `windows` training windows, `batch` a step, at most `cap` (at least 1)."""
    return max(1, min(cap, round(epochs * windows / batch)))


class Guard:
    """Tracks a held-out loss while `params` train; keeps the best ones (the start's included).

    ``evaluate()`` returns the held-out loss of the current parameters; it runs now (the start) and from
    :meth:`check` every `every` steps. :meth:`finish` copies the best parameters back and returns the report.
    """

    def __init__(self, params: Sequence[torch.Tensor], evaluate: Callable[[], float], every: int, patience: int):
        self.params, self.evaluate, self.every, self.patience = list(params), evaluate, max(1, every), patience
        self.start = float(evaluate())
        if not math.isfinite(self.start):
            raise SvdkitError(f"the held-out loss of the start is {self.start}: the compressed model is broken")
        self.best, self.best_step, self.bad = self.start, 0, 0
        self.saved = [p.detach().clone() for p in self.params]
        self.curve: list[dict] = [{"step": 0, "held_out": self.start}]

    @torch.no_grad()
    def check(self, step: int, last: bool = False) -> bool:
        """After training step `step` (1-based): measure when due (or `last`); True when training should stop."""
        if step % self.every and not last:
            return False
        loss = float(self.evaluate())
        self.curve.append({"step": step, "held_out": loss})
        if math.isfinite(loss) and loss < self.best:
            self.best, self.best_step, self.bad = loss, step, 0
            for kept, p in zip(self.saved, self.params, strict=True):
                kept.copy_(p)
            return False
        self.bad += 1
        return not math.isfinite(loss) or self.bad >= self.patience

    @torch.no_grad()
    def finish(self, steps_run: int) -> dict:
        """Restore the best parameters; the report: held-out loss at the start and at the best step, the curve."""
        for kept, p in zip(self.saved, self.params, strict=True):
            p.copy_(kept)
        self.saved = []
        return {
            "held_out_start": self.start,
            "held_out_best": self.best,
            "best_step": self.best_step,
            "steps_run": steps_run,
            "stopped_early": self.bad >= self.patience,
            "held_out_curve": self.curve,
        }
