"""The PNG plots of a benchmark run (:mod:`svdkit.bench`).

- ``ppl_vs_ratio.png``: WikiText-2 and PTB perplexity against the ratio, one line per method and
  allocation, log scale, the dense model as a dotted line;
- ``ranks-<cell>-<ratio>.png``: the rank map of every cell whose ranks are not uniform;
- ``curve-<cell>-<ratio>.png``: the training curve of a cell that trains (soco);
- ``spectra.png``: normalized singular values of a few matrices, of W and of the whitened W S^(1/2)
  (S^(1/2) the symmetric square root of the calibration Gram matrix): whitening concentrates what
  matters for the layer's outputs in fewer components, which is why activation-aware truncation works.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .plot import _pyplot, _save, plot_curve, plot_rank_map

__all__ = ["write_plots", "cell_rank_info", "plot_ppl_vs_ratio", "whitened_spectra", "plot_spectra"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")


def _series(report: dict) -> dict[str, list[dict]]:
    from .bench import _alloc_label, cell_label

    series: dict[str, list[dict]] = {}
    for c in report["cells"]:
        alloc = _alloc_label(c)
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
    """The :func:`svdkit.plot.plot_rank_map` input of a result cell (its ranks over the model's target shapes)."""
    return {
        "method": cell["method"],
        "ratio": cell["ratio"],
        "allocation": {"name": cell["allocation"]},
        "ranks": cell["ranks"],
        "shapes": {n: list(s) for n, s in shapes.items()},
    }


def write_plots(report: dict, folder: Path, model: nn.Module, stats=None) -> list[Path]:
    """Every plot of `report` into `folder` (created); `model` is the dense model, `stats` its statistics."""
    from .models import find_architecture

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if report["cells"]:
        written.append(plot_ppl_vs_ratio(report, folder / "ppl_vs_ratio.png"))
    shapes = find_architecture(model).shapes()
    for c in report["cells"]:
        stem = _slug(f"{c['method']}-{c['allocation']}-{c['ratio']}")
        if c["allocation"] != "uniform" or "training" in c:
            written.append(plot_rank_map(cell_rank_info(c, shapes), folder / f"ranks-{stem}.png"))
        curve = (c.get("training") or {}).get("curve")
        if curve:
            written.append(plot_curve(curve, folder / f"curve-{stem}.png", title=f"{c['method']} at {c['ratio']}"))
    if stats is not None:
        names = [n for n in _spectrum_names(shapes) if n in stats and "gram" in stats[n]]
        if names:
            written.append(plot_spectra(whitened_spectra(model, stats, names), folder / "spectra.png"))
    return written
