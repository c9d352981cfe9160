"""SoCo's training report (:class:`~svdkit.core.report.Report`): the budget and the parameters kept, the loss
curve per step, and the held-out losses of the start decomposition and of the result."""

from __future__ import annotations

import time

from ...core.ranks import cost
from ...core.report import Report, held_out_line

__all__ = ["training_report"]


def training_report(
    config, curve, guard: dict, budget: int, start: int, ranks, shapes, windows: int, t0: float
) -> Report:
    """The training's report: the budget and the count kept, the loss curve per step, the held-out losses of the
    start decomposition and of the result (where windows were held out)."""
    seconds, kept = round(time.perf_counter() - t0, 2), int(sum(cost(shapes[n], r) for n, r in ranks.items()))
    final_loss = curve[-1]["loss"] if curve else None
    closed, trained = guard.get("held_out_closed_form"), guard.get("held_out_trained")
    best = None if closed is None else min(closed, trained)
    curves = {"curve": curve, **({"held_out_curve": guard.pop("held_out_curve")} if "held_out_curve" in guard else {})}
    summary = f"{config.steps} steps, final loss {final_loss:.4f}; " if curve else ""
    summary += f"{kept:,} target parameters kept for a budget of {budget:,}" + held_out_line(closed, best)
    epochs = round(config.steps * config.batch / windows, 2)
    facts = {"budget": budget, "start": start, "kept": kept, "objective": config.loss, "final_loss": final_loss}
    return Report(
        seconds,
        config.steps,
        summary,
        closed,
        best,
        curves,
        {**facts, "train_windows": windows, "epochs": epochs, **guard},
    )
