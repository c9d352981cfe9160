"""Every PNG plot svdkit draws.

- the rank map of a compressed folder (decoder layers x module types, coloured by the share of each
  matrix's parameters kept, k (m + n) / (m n), 1 for a matrix kept dense, rank written in):
  :func:`plot_rank_map`, used by ``svdkit info --plot``;
- a training curve (SoCo's loss and kept share per step): :func:`plot_curve`;
- for a benchmark run (:func:`write_plots`): ``ppl_vs_ratio.png`` (WikiText-2 and PTB perplexity
  against the ratio, one line per method and allocation, log scale, the dense model dotted),
  ``ranks-<cell>-<ratio>.png`` for every cell whose ranks are not uniform, ``curve-<cell>-<ratio>.png``
  for a cell that trains, and ``spectra.png``: normalized singular values of a few matrices, of W and
  of the whitened W S^(1/2) (S^(1/2) the symmetric square root of the calibration Gram matrix):
  whitening concentrates what matters for the layer's outputs in fewer components, which is why
  activation-aware truncation works.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from ..allocators import get_allocator
from ..core.architecture import find_architecture
from ..errors import SvdkitError
from .report import alloc_label, cell_label

__all__ = [
    "rank_grid",
    "plot_rank_map",
    "plot_curve",
    "write_plots",
    "cell_rank_info",
    "plot_ppl_vs_ratio",
    "whitened_spectra",
    "plot_spectra",
]


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

    def phase(row: dict) -> str | None:  # curves written before the word was "phase" say "stage"
        return row.get("phase", row.get("stage"))

    phase_starts = [(row["step"], phase(row)) for i, row in enumerate(curve) if i and phase(row) != phase(curve[i - 1])]
    for step, name in phase_starts:
        ax.axvline(step, color="grey", lw=0.6, ls="--")
        ax.text(step, ax.get_ylim()[1], f" {name}", fontsize=7, va="top")
    ax.set_title(title, fontsize=9)
    return _save(fig, plt, path)


def plot_rank_map(info: dict, path: str | os.PathLike) -> Path:
    """Write the rank map of `info` (from :func:`svdkit.saved.folder.folder_info`) to a PNG file at `path`."""
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")


def _series(report: dict) -> dict[str, list[dict]]:
    series: dict[str, list[dict]] = {}
    for c in report["cells"]:
        alloc = alloc_label(c)
        name = cell_label(c) + ("" if alloc == "uniform" else f" @{alloc}")
        series.setdefault(name, []).append(c)
    return {k: sorted(v, key=lambda c: c["ratio"]) for k, v in series.items()}


def plot_ppl_vs_ratio(report: dict, path: str | Path) -> Path:
    """Perplexity (log scale) against the ratio per method and allocation, WikiText-2 and PTB side by side."""
    path, plt = _pyplot(path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "wikitext2", "WikiText-2 test"), (axes[1], "ptb", "PTB validation")):
        for name, cells in _series(report).items():
            ax.plot([c["ratio"] for c in cells], [c[key] for c in cells], marker="o", ms=3, label=name)
        ax.axhline(report["dense"][key], color="black", ls=":", lw=0.8, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("ratio (share of target parameters removed)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{report['model']}: {title}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7, loc="upper left")
    return _save(fig, plt, path)


def whitened_spectra(model: nn.Module, stats, names: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    """{name: (singular values of W, of W S^(1/2)), each divided by its largest} (float64, Gram from `stats`)."""
    out = {}
    for name in names:
        W = model.get_submodule(name).weight.detach().double().cpu()
        G = stats[name].gram_mean
        evals, evecs = torch.linalg.eigh(G)
        root = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T
        plain = torch.linalg.svdvals(W)
        white = torch.linalg.svdvals(W @ root)
        out[name] = ((plain / plain[0]).tolist(), (white / white[0]).tolist())
    return out


def plot_spectra(spectra: dict[str, tuple[list[float], list[float]]], path: str | Path) -> Path:
    """One panel per matrix: the normalized spectra of W and of the whitened W (log scale)."""
    path, plt = _pyplot(path)
    fig, axes = plt.subplots(1, len(spectra), figsize=(4 * len(spectra), 3.4), squeeze=False)
    for ax, (name, (plain, white)) in zip(axes[0], spectra.items(), strict=True):
        ax.plot(plain, label="W", lw=1)
        ax.plot(white, label="W S^(1/2) (whitened)", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("component")
        ax.set_ylabel("singular value / largest")
        ax.set_title(name, fontsize=8)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    return _save(fig, plt, path)


def _spectrum_names(shapes: dict) -> list[str]:
    """The first layer's first target, a middle layer's last target and the last layer's third target."""
    by_layer: dict[int, list[str]] = {}
    for name in shapes:
        m = re.search(r"\.(\d+)\.", name)
        if m:
            by_layer.setdefault(int(m.group(1)), []).append(name)
    if not by_layer:
        return list(shapes)[:3]
    layers = sorted(by_layer)
    first, middle, last = by_layer[layers[0]], by_layer[layers[len(layers) // 2]], by_layer[layers[-1]]
    return list(dict.fromkeys([first[0], middle[-1], last[min(2, len(last) - 1)]]))


def cell_rank_info(cell: dict, shapes: dict) -> dict:
    """The :func:`plot_rank_map` input of a result cell (its ranks over the model's target shapes)."""
    return {
        "method": cell["method"],
        "ratio": cell["ratio"],
        "allocation": {"name": cell["allocation"]},
        "ranks": cell["ranks"],
        "shapes": {n: list(s) for n, s in shapes.items()},
    }


def write_plots(report: dict, folder: Path, model: nn.Module, stats=None) -> list[Path]:
    """Every plot of `report` into `folder` (created); `model` is the dense model, `stats` its statistics."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if report["cells"] and report.get("perplexity", True):
        written.append(plot_ppl_vs_ratio(report, folder / "ppl_vs_ratio.png"))
    shapes = find_architecture(model).shapes()
    for c in report["cells"]:
        stem = _slug(f"{c['method']}-{c['allocation']}-{c['ratio']}")
        if get_allocator(c["allocation"]).per_matrix or "training" in c:
            written.append(plot_rank_map(cell_rank_info(c, shapes), folder / f"ranks-{stem}.png"))
        curve = (c.get("training") or {}).get("curve")
        if curve:
            written.append(plot_curve(curve, folder / f"curve-{stem}.png", title=f"{c['method']} at {c['ratio']}"))
    if stats is not None:
        names = [n for n in _spectrum_names(shapes) if n in stats and "gram" in stats[n]]
        if names:
            written.append(plot_spectra(whitened_spectra(model, stats, names), folder / "spectra.png"))
    return written
