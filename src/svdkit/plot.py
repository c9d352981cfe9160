"""PNG plots: the rank map of a compressed folder (decoder layers x module types, coloured by the share
of each matrix's parameters kept, k (m + n) / (m n), 1 for a matrix kept dense, rank written in) and a
training curve (SoCo's loss and kept share per step)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import SvdkitError

__all__ = ["rank_grid", "plot_rank_map", "plot_curve"]


def rank_grid(info: dict) -> tuple[list[int], list[str], dict[tuple[int, str], tuple[int | None, float]]]:
    """(layers, module types, {(layer, type): (rank or None if dense, kept share)}) from :func:`folder_info`."""
    cells: dict[tuple[int, str], tuple[int | None, float]] = {}
    kinds: list[str] = []
    for name, (m, n) in info["shapes"].items():
        match = re.search(r"\.(\d+)\.(.+)$", name)
        if match is None:
            continue
        layer, kind = int(match.group(1)), match.group(2)
        if kind not in kinds:
            kinds.append(kind)
        k = info["ranks"].get(name)
        cells[(layer, kind)] = (k, 1.0 if k is None else k * (m + n) / (m * n))
    layers = sorted({layer for layer, _ in cells})
    return layers, kinds, cells


def _pyplot(path: str | os.PathLike):
    """(checked PNG path, matplotlib.pyplot) with clear errors for a bad path or missing matplotlib."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SvdkitError(f"the plot is written as PNG: give a file name ending in .png, not '{path.name}'")
    if not path.parent.is_dir():
        raise SvdkitError(f"cannot write the plot: folder '{path.parent}' does not exist")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SvdkitError("plotting needs matplotlib: pip install 'svdkit[plot]' (or matplotlib)") from e
    return path, plt


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise SvdkitError(f"cannot write the plot to {path}: {e}") from e
    finally:
        plt.close(fig)
    return path


def plot_curve(curve: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Training loss and kept share of the target parameters per step (SoCo's curve) as a PNG."""
    path, plt = _pyplot(path)
    if not curve or not all({"step", "loss", "kept"} <= set(row) for row in curve):
        raise SvdkitError("the training curve is empty or lacks step/loss/kept records")
    steps = [row["step"] for row in curve]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(steps, [row["loss"] for row in curve], lw=0.8, color="tab:blue")
    ax.set_xlabel("step")
    objective = {"kd": "KL from the start decomposition"}.get(curve[0].get("objective"), "cross-entropy")
    ax.set_ylabel(f"{objective} (training windows)", color="tab:blue")
    twin = ax.twinx()
    twin.plot(steps, [row["kept"] for row in curve], color="tab:orange", label="kept")
    if all("soft" in row for row in curve):  # the L1 count sum c min(s, 1) that the penalty steers
        twin.plot(steps, [row["soft"] for row in curve], color="tab:green", lw=0.8, label="soft count")
    if all("target" in row for row in curve):
        twin.plot(steps, [row["target"] for row in curve], color="tab:orange", ls=":", label="target")
    twin.set_ylabel("kept share of target parameters", color="tab:orange")
    twin.legend(loc="lower left", fontsize=7)
    stage_starts = [
        (row["step"], row.get("stage"))
        for i, row in enumerate(curve)
        if i and row.get("stage") != curve[i - 1].get("stage")
    ]
    for step, stage in stage_starts:
        ax.axvline(step, color="grey", lw=0.6, ls="--")
        ax.text(step, ax.get_ylim()[1], f" {stage}", fontsize=7, va="top")
    ax.set_title(title, fontsize=9)
    return _save(fig, plt, path)


def plot_rank_map(info: dict, path: str | os.PathLike) -> Path:
    """Write the rank map of `info` (from :func:`svdkit.cli.folder_info`) to a PNG file at `path`."""
    path, plt = _pyplot(path)
    layers, kinds, cells = rank_grid(info)
    if not cells:
        raise SvdkitError("this folder records no per-layer modules to plot")
    grid = [[cells.get((layer, kind), (None, float("nan")))[1] for kind in kinds] for layer in layers]
    fig, ax = plt.subplots(figsize=(1.2 * len(kinds) + 2, 0.28 * len(layers) + 1.6))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i, layer in enumerate(layers):
        for j, kind in enumerate(kinds):
            if (layer, kind) in cells:
                k, share = cells[(layer, kind)]
                ax.text(
                    j,
                    i,
                    "dense" if k is None else str(k),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if share > 0.6 else "white",
                )
    ax.set_xticks(range(len(kinds)), [k.rsplit(".", 1)[-1] for k in kinds], rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_ylabel("decoder layer")
    alloc = (info.get("allocation") or {}).get("name", "uniform")
    ax.set_title(f"{info.get('method')} at ratio {info.get('ratio')}, allocation {alloc}", fontsize=9)
    fig.colorbar(image, ax=ax, label="kept share of parameters")
    return _save(fig, plt, path)
