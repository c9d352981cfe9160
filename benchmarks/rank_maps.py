"""Rank-map PNGs (and SoCo training curves) of protocol cells, and a per-type summary to compare allocations.

    python benchmarks/rank_maps.py docs/results/soco.json docs/results/v2.json --out docs/results/plots

For every cell whose ranks are not uniform (an allocation other than uniform, or a method that
allocates itself, such as soco) writes OUT/<method>[-<allocation>]-<ratio>-ranks.png, and for a cell
with a training curve OUT/<method>-<ratio>-curve.png; prints, per cell, the mean kept share of each
module type over the first, middle and last third of the layers.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import svdkit
from svdkit.bench.plots import cell_rank_info, plot_curve, plot_rank_map


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="protocol JSON files")
    p.add_argument("--out", default="docs/results/plots")
    p.add_argument("--model", default="smollm2-135m")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, _ = svdkit.load_model(args.model)
    shapes = svdkit.find_architecture(model).shapes()
    n_layers = len(svdkit.find_architecture(model).layers)
    for path in args.results:
        for cell in json.loads(Path(path).read_text())["cells"]:
            uniform = cell["allocation"] == "uniform" and "training" not in cell
            if uniform:
                continue
            opts = cell.get("allocation_options") or {}
            alloc = "" if cell["allocation"] == "uniform" else f"-{cell['allocation']}"
            alloc += "".join(f"-{k}{v}" for k, v in opts.items())
            stem = f"{cell['method']}{alloc}-{cell['ratio']}"
            plot_rank_map(cell_rank_info(cell, shapes), out / f"{stem}-ranks.png")
            if "training" in cell:
                plot_curve(cell["training"]["curve"], out / f"{stem}-curve.png", title=f"{stem}: training")
            if "wikitext2" in cell:  # a `bench --no-perplexity` file has none
                print(f"{stem}: WikiText-2 {cell['wikitext2']:.2f}, PTB {cell['ptb']:.2f}")
            print("  kept share by type (layers first third / middle / last third)")
            thirds = [
                range(0, n_layers // 3),
                range(n_layers // 3, 2 * n_layers // 3),
                range(2 * n_layers // 3, n_layers),
            ]
            kinds: dict[str, list[list[float]]] = {}
            for name, (m, n) in shapes.items():
                layer, kind = re.search(r"\.(\d+)\.(.+)$", name).groups()
                k = cell["ranks"].get(name)
                share = 1.0 if k is None else k * (m + n) / (m * n)
                rows = kinds.setdefault(kind, [[], [], []])
                rows[next(i for i, t in enumerate(thirds) if int(layer) in t)].append(share)
            for kind, rows in kinds.items():
                print(f"  {kind:<18}" + " / ".join(f"{sum(r) / len(r):.2f}" for r in rows))


if __name__ == "__main__":
    main()
