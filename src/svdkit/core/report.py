"""The one report of every training stage (a method's whole-model training such as SoCo's, each healer).

The pipeline records reports and the command line prints and writes them without knowing whose they are: the
saved config keeps :meth:`Report.record` (scalars only), the command line prints its line (:func:`stage_line`: the
summary and the time, from a report or a saved record alike) and writes :meth:`Report.as_dict` (curves included)
beside the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Report", "finite", "held_out_line", "stage_line"]

Curve = list[dict[str, Any]]


@dataclass
class Report:
    """What a training stage did: its time, its steps, its held-out loss at the start and at the best step
    (None where it holds nothing out), a one-line summary (without the time, so a record is the same whenever
    it ran), its curves by name (rows of numbers) and any other
    facts (scalars) worth recording."""

    seconds: float
    steps: int
    summary: str
    held_out_start: float | None = None
    held_out_best: float | None = None
    curves: dict[str, Curve] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The scalars, as the saved config keeps them (no curves; a non-finite number as None: valid JSON)."""
        held = {"held_out_start": self.held_out_start, "held_out_best": self.held_out_best}
        return finite({"seconds": self.seconds, "steps": self.steps, **held, **self.facts, "summary": self.summary})

    def as_dict(self) -> dict[str, Any]:
        """Everything, curves included (the JSON written beside the model and into the bench's results)."""
        return {**self.record(), **finite(self.curves)}


def finite(value: Any) -> Any:
    """`value` with every NaN or infinity (a diverged loss in a curve) replaced by None, as JSON allows."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def stage_line(record: dict[str, Any]) -> str:
    """The line printed for a report's record: its summary and its time (folders saved by older versions
    recorded no summary: the time alone)."""
    seconds = record.get("seconds")
    time = f"{seconds:.0f}s" if isinstance(seconds, int | float) else "time unknown"
    return f"{record['summary']} ({time})" if record.get("summary") else time


def held_out_line(start: float | None, best: float | None) -> str:
    """', held-out loss A -> B' (where no step improved on A: that the start is kept), '' where nothing was held
    out."""
    if start is None or best is None:
        return ""
    if best < start:
        return f", held-out loss {start:.4g} -> {best:.4g}"
    return f", held-out loss {start:.4g}: no step improved it, the start is kept"
