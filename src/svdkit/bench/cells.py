"""The bench's protocol and cells: the protocol's constants (calibration, the validation slice, the ranges
calibration texts are drawn from), its configuration, the cell specs of the grid
(METHOD[@ALLOCATION[:KEY=VALUE,...]][+lstsq][+seq][+heal:NAME[,NAME][:NAME.KEY=VALUE,...]]), and the settings a
results file records, by which a rerun resumes its finished cells."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..allocators import allocator_names
from ..core.options import parse_assignment
from ..errors import SvdkitError
from ..heal import parse_heal
from ..measure.scorecard import VALIDATION
from ..methods import get_method, method_names
from ..pipeline.options import CalibrationSettings
from ..sources.mixture import parse_calib

__all__ = [
    "PROTOCOL_CALIBRATION",
    "PROTOCOL_RANGES",
    "VALIDATION",
    "BenchConfig",
    "CellSpec",
    "as_cell",
    "cell_key",
    "finished_cells",
    "parse_options",
    "parse_spec",
    "protocol_spec",
    "results_settings",
    "settings_of",
]

PROTOCOL_CALIBRATION = CalibrationSettings(source="wikitext2", samples=32, seqlen=2048, offset=150000, seed=0)
"""the protocol's calibration: 32 windows of 2048 WikiText-2 test tokens at seeded offsets from 150000"""

PROTOCOL_RANGES = {"ptb": "[32768:]", "demo": "[:-32768]"}
"""the token range a named calibration part without a slice is drawn from in the bench, clear of the test and
validation windows: PTB validation after its first 16 windows of 2048 (8 test, 8 validation), Python's
docs before their last 16 (8 test, 8 validation); WikiText-2 from the calibration offset (150000), any
other text whole"""


def protocol_spec(spec: str, offset: int) -> str:
    """`spec` with the protocol's range on every part without a slice (``self`` aside): ``wikitext2`` from
    `offset`, ptb and demo as :data:`PROTOCOL_RANGES`, other texts whole."""
    out = []
    for part in parse_calib(spec):
        text = str(part)
        if not part.sliced and part.source != "self":
            cut = f"[{offset}:]" if part.source == "wikitext2" else PROTOCOL_RANGES.get(part.source, "[0:]")
            text = part.source + cut + ("" if part.windows is None else f":{part.windows}")
        out.append(text)
    return ",".join(out)


@dataclass(frozen=True)
class CellSpec:
    """One row of the grid (without its ratio)."""

    method: str
    allocation: str = "uniform"
    update: str = "none"
    sequential: bool = False
    options: str = "{}"  # allocation options as sorted JSON (hashable)
    heal: str = "none"
    heal_options: str = "{}"  # NAME.KEY -> value, sorted JSON


@dataclass
class BenchConfig:
    model: str = "smollm2-135m"
    cells: Sequence[str] = ("svd", "svd-llm")
    ratios: Sequence[float] = (0.2, 0.4, 0.6)
    data_dir: str | None = None
    calibration: CalibrationSettings = dataclasses.field(
        default_factory=lambda: dataclasses.replace(PROTOCOL_CALIBRATION)
    )
    """its seqlen is also the evaluation window; its source a calibration spec (the protocol's: wikitext2),
    whose parts without a slice are drawn from the protocol's ranges (:func:`protocol_spec`)"""
    heal_calib: str | None = None
    """the healing cells' text, a spec like the calibration's (None: they heal on the calibration windows)"""
    eval_windows: int = 16
    ptb_windows: int = 8
    pydoc_windows: int = 8
    """the third domain: the last windows of Python's documentation text"""
    zero_shot: int | None = None
    """the scorecard's zero-shot tasks on their first N documents each, for dense and every cell (None: none)"""
    generation: bool = True
    """greedy continuations of 16 prompts from the validation slice: repeated 3-grams, distinct-2"""
    perplexity: bool = True
    """False measures no perplexity (e.g. generation scores for cells whose perplexity another run holds)"""
    allocation_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    """options by allocation name for every cell of that allocation (a cell's own options win)"""
    device: str = "auto"
    dtype: str = "float32"
    """the dtype the model is loaded and compressed in (the protocol's is float32)"""
    speed: bool = True
    decode_tokens: int = 64
    repeats: int = 3
    plots: bool = True
    rank_multiple: int = 8

    @property
    def seqlen(self) -> int:
        return self.calibration.seqlen


def parse_options(text: str) -> dict:
    """'rule=power,strength=0.5' -> {'rule': 'power', 'strength': 0.5} (values read as JSON when they parse)."""
    options = {}
    for part in filter(None, text.split(",")):
        try:
            key, value = parse_assignment(part)
        except ValueError:
            raise SvdkitError(f"cell options are KEY=VALUE separated by commas, got {part!r}") from None
        options[key] = value
    return options


def parse_spec(spec: str) -> CellSpec:
    """'svd-llm@v2:strength=0.5+lstsq+seq+heal:block,kd:kd.lr=1e-4' -> CellSpec, checking the method,
    allocation and healing names and the healers' options."""
    head, *flags = spec.split("+")
    heals = [f.partition(":")[2] for f in flags if f.startswith("heal:")]
    flags = [f for f in flags if not f.startswith("heal:")]
    unknown = set(flags) - {"lstsq", "seq"}
    if unknown or len(heals) > 1:
        raise SvdkitError(
            f"unknown flag(s) {sorted(unknown)} in cell '{spec}': use +lstsq, +seq and one +heal:NAME[,NAME]"
        )
    heal, _, heal_opts = (heals[0] if heals else "none").partition(":")
    heal_options = parse_options(heal_opts)
    parse_heal(heal, heal_options)
    head, _, opts = head.partition(":")
    method, _, allocation = head.partition("@")
    allocation = allocation or "uniform"
    if method not in method_names():
        raise SvdkitError(f"unknown method '{method}' in cell '{spec}'; known: {', '.join(method_names())}")
    if allocation not in allocator_names():
        raise SvdkitError(f"unknown allocation '{allocation}' in cell '{spec}'; known: {', '.join(allocator_names())}")
    if get_method(method).ranks is not None:
        raise SvdkitError(
            f"method '{method}' sets its own ranks, so the bench's ratio grid does not apply to it: measure it with "
            "svdkit compress and svdkit eval --scorecard (a bytes track for the bench is still to come)"
        )
    return CellSpec(
        method,
        allocation,
        "lstsq" if "lstsq" in flags else "none",
        "seq" in flags,
        json.dumps(parse_options(opts), sort_keys=True),
        heal,
        json.dumps(heal_options, sort_keys=True),
    )


def cell_key(cell: dict) -> tuple:
    return (
        cell["method"],
        cell.get("allocation", "uniform"),
        cell["ratio"],
        cell.get("update", "none"),
        bool(cell.get("sequential", False)),
        json.dumps(cell.get("allocation_options") or {}, sort_keys=True),
        cell.get("heal", "none"),
        json.dumps(cell.get("heal_options") or {}, sort_keys=True),
    )


def as_cell(spec: CellSpec, ratio: float) -> dict:
    """The fields of a result cell that `spec` at `ratio` fixes (for :func:`cell_key`)."""
    options = {"allocation_options": json.loads(spec.options), "heal_options": json.loads(spec.heal_options)}
    return {**asdict(spec), "ratio": ratio, **options}


def results_settings(config: BenchConfig) -> dict:
    """The settings a results file records, which a resumed run must share."""
    c = config.calibration
    calibration = {"source": c.source, "samples": c.samples, "seqlen": c.seqlen, "offset": c.offset, "seed": c.seed}
    return {
        "model": config.model,
        "seqlen": config.seqlen,
        "eval_windows": config.eval_windows,
        "ptb_windows": config.ptb_windows,
        "rank_multiple": config.rank_multiple,
        "dtype": config.dtype,
        "perplexity": config.perplexity,
        "zero_shot_limit": config.zero_shot,
        "calibration": {**calibration, **({"heal_calib": config.heal_calib} if config.heal_calib else {})},
    }


def finished_cells(json_path: Path, report: dict) -> dict:
    """Finished cells of an earlier run with the same settings, by key (refuses other settings)."""
    if not json_path.exists():
        return {}
    old = json.loads(json_path.read_text())
    mine = settings_of(report)
    theirs = settings_of(old)
    if mine != theirs:
        raise SvdkitError(
            f"{json_path} holds results of other settings ({theirs} vs {mine}): choose another output or remove it"
        )
    report["dense"] = old.get("dense")
    report["calibration"]["passes"] = old.get("calibration", {}).get("passes", {})
    return {cell_key(c): c for c in old.get("cells", [])}


def settings_of(report: dict) -> dict:
    """The settings of a results file (those written before a setting existed read with its default)."""
    calib = {k: v for k, v in report.get("calibration", {}).items() if k not in ("seconds", "passes")}
    calib.setdefault("source", "wikitext2")  # a file written before --calib existed used the protocol's text
    plain = {k: report.get(k) for k in ("model", "seqlen", "eval_windows", "ptb_windows")}
    kept = {
        "rank_multiple": report.get("rank_multiple", 1),
        "dtype": report.get("dtype", "float32"),
        "perplexity": report.get("perplexity", True),
        "zero_shot_limit": report.get("zero_shot_limit"),
    }
    return {**plain, **kept, "calibration": calib}
