"""``svdkit info``: what a compressed model folder holds (method, ratio, ranks, parameters), read without
loading the model; optionally its rank map and training curve as PNGs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..bench.plots import plot_curve, plot_rank_map
from ..core.report import stage_line
from ..errors import SvdkitError
from ..saved.contents import compression_words, folder_info, natural_key
from .common import CURVE_FILE, emit

__all__ = ["add_parser", "run"]

JSON_KEYS = (
    "method",
    "ratio",
    "quantized",
    "allocation",
    "update",
    "kv_ratio",
    "heal",
    "calibration",
    "params",
    "params_dense",
    "ranks",
    "dense_kept",
)


def add_parser(sub) -> None:
    i = sub.add_parser("info", help="what a compressed model folder holds: method, ratio, ranks, parameters")
    i.add_argument("folder")
    i.add_argument("--plot", metavar="FILE.png", help="also draw the rank map (layers x module types) as a PNG")
    i.add_argument("--plot-curve", metavar="FILE.png", help=f"draw the training curve ({CURVE_FILE}, soco) as a PNG")
    i.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    i.set_defaults(run=run)


def run(a: argparse.Namespace) -> None:
    info = folder_info(a.folder)
    _summary(info)
    _modules(info)
    if a.plot:
        plot_rank_map(info, a.plot)
        print(f"rank map written to {a.plot}")
    if a.plot_curve:
        _plot_curve(a.folder, info, a.plot_curve)
    emit({k: info[k] for k in JSON_KEYS}, a.json)


def _summary(info: dict) -> None:
    alloc = info.get("allocation") or {}
    multiple = alloc.get("rank_multiple", 1)
    aligned = f" (ranks in multiples of {multiple})" if multiple > 1 else ""
    print(
        f"method {info['method']}, {compression_words(info)}, allocation {alloc.get('name', 'uniform')}{aligned}, "
        f"svdkit {info['version']}"
    )
    if info["quantized"]:
        print(f"parameters {info['params']:,} besides the quantized base (dense {info['params_dense']:,})")
    elif info["params_dense"]:
        print(
            f"parameters {info['params']:,} (dense {info['params_dense']:,}, "
            f"{100 * (1 - info['params'] / info['params_dense']):.1f}% fewer)"
        )
    if "bits_per_weight" in alloc:  # a byte budget's record
        budget = alloc["config"]["bits_per_weight"]
        print(
            f"targets stored in {alloc['bits_per_weight']} bits per weight (budget {budget}), {alloc['bytes']:,} bytes"
        )
    if info["update"] != "none":
        print(f"parameter update: {info['update']}")
    if info["kv_ratio"] is not None:
        print(f"k_proj/v_proj sized for a {info['kv_ratio']:.0%} smaller KV cache (load with kv_cache='latent')")
    if info["training"]:
        print(f"training: {stage_line(info['training'])}")
    _print_text("calibration", info.get("calibration"))
    for h in info["heal"]:
        print(f"healing {h['name']}: {stage_line(h)}")
        _print_text("  healing text", h.get("calibration"))


def _print_text(what: str, record: dict | None) -> None:
    """One line for a calibration record: the spec, its windows and each part of a mixture."""
    if not record or "source" not in record:
        return
    parts = record.get("parts") or []
    shown = f" ({'; '.join(_part(p) for p in parts)})" if parts else ""
    print(
        f"{what}: {record['source']}, {record.get('samples')} windows of {record.get('seqlen')} tokens, seed "
        f"{record.get('seed')}{shown}"
    )


def _part(part: dict) -> str:
    """A part of a calibration record: its source, windows and token range."""
    if part.get("generation") is not None:
        return f"{part['source']}: {part['windows']} windows written by the model"
    end = "" if part.get("end") is None else part["end"]
    return f"{part['source']}: {part['windows']} windows from tokens [{part.get('start') or 0}:{end}]"


def _modules(info: dict) -> None:
    ranks = dict(sorted(info["ranks"].items(), key=lambda kv: natural_key(kv[0])))
    shapes = info["shapes"]
    print(f"{len(ranks)} low-rank modules, {len(info['dense_kept'])} target modules kept dense:")
    width = max((len(n) for n in shapes), default=0)
    for name, (m, n) in shapes.items():
        k = ranks.get(name)
        what = f"rank {k:<5d} keeps {k * (m + n) / (m * n):6.1%}" if k is not None else "dense"
        print(f"  {name:<{width}}  {m}x{n}  {what}")


def _plot_curve(folder: str, info: dict, png: str) -> None:
    curve_file = Path(folder) / CURVE_FILE
    if not curve_file.is_file():
        raise SvdkitError(f"'{folder}' has no {CURVE_FILE}: only a method that trains (soco) writes one")
    try:
        curve = json.loads(curve_file.read_text())
    except (OSError, ValueError) as e:
        raise SvdkitError(f"cannot read {curve_file}: {e}") from e
    plot_curve(curve, png, title=f"{info['method']}, {compression_words(info)}")
    print(f"training curve written to {png}")
