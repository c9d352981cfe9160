"""Perplexity against bytes on disk: every point of the bytes track in one figure (a panel per domain), and
one table of every row (generality against the float32 row of quant_baselines.py).

    python benchmarks/bytes_plot.py [--results docs/results] [--out docs/results/plots/bytes.png]
        [--table docs/results/bytes.md]

Reads the rows of quant_baselines.py (ONNX Runtime: float32, int8 and int4 by each quantizer),
llamacpp_baselines.py (GGUF: F32, Q8_0, Q4_0, Q4_1, Q4_K_M with and without an importance matrix) and
qlr_sweep.py score (svdkit: Q + LR cells and low-rank-only SVD-LLM, int4 exports, drawn apart); a file not
there is skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bytes_table import markdown

HERE = Path(__file__).resolve().parent
SOURCES = {
    "quant_baselines": ("ONNX Runtime quantizers", "o", "tab:blue"),
    "llamacpp_baselines": ("llama.cpp GGUF", "s", "tab:green"),
    "qlr": ("svdkit Q + LR, int4 export", "^", "tab:red"),
}
LOW_RANK = ("svdkit low rank only (svd-llm), int4 export", "v", "tab:purple")
DOMAINS = {"wikitext2": "WikiText-2", "ptb": "PTB", "pydoc": "Python docs"}


def points(results: Path) -> dict[str, list[dict]]:
    out = {}
    for folder in SOURCES:
        f = results / folder / "results.json"
        if f.is_file():
            out[folder] = json.loads(f.read_text())["rows"]
    return out


def groups(found: dict[str, list[dict]]) -> list[tuple[tuple, list[dict]]]:
    """(label, marker, colour) and rows of each kind of point: a source's rows, svdkit's low-rank-only apart."""
    out = []
    for folder, rows in found.items():
        low = [r for r in rows if r["name"].startswith("svd-llm-")]
        out.append((SOURCES[folder], [r for r in rows if r not in low]))
        if low:
            out.append((LOW_RANK, low))
    return [(style, rows) for style, rows in out if rows]


def write_table(found: dict[str, list[dict]], path: Path) -> None:
    """Every row of every source, sorted by bytes, in one table (the decode column: each run's own ratio)."""
    rows = sorted(
        (dict(r, name=f"{r['name']} ({SOURCES[f][0]})") for f, rs in found.items() for r in rs),
        key=lambda r: r["bytes"],
    )
    for r in rows:
        r["decode_ratio"] = next(v for k, v in r.items() if k.startswith("decode_vs_"))
    dense = next(r["ppl"] for r in found.get("quant_baselines", []) if r["name"] == "float32")
    command = "python benchmarks/bytes_plot.py (rows of quant_baselines.py, llamacpp_baselines.py, qlr_sweep.py)"
    path.write_text(
        markdown(
            rows, dense, command, "see each source's results.json", ("decode_ratio", "decode vs its run's reference")
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(HERE.parent / "docs" / "results"))
    p.add_argument("--out", default=str(HERE.parent / "docs" / "results" / "plots" / "bytes.png"))
    p.add_argument("--table", default=str(HERE.parent / "docs" / "results" / "bytes.md"))
    args = p.parse_args()
    write_table(points(Path(args.results)), Path(args.table))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = points(Path(args.results))
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.5))
    for ax, (domain, title) in zip(axes, DOMAINS.items(), strict=True):
        for style, rows in groups(found):
            label, marker, color = style
            xs = [r["bytes"] / 1e6 for r in rows]
            ys = [r["ppl"][domain] for r in rows]
            ax.scatter(xs, ys, marker=marker, color=color, label=label, s=40)
            for r, x, y in zip(rows, xs, ys, strict=True):
                ax.annotate(r["name"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("MB on disk (the files the runtime loads)")
        ax.set_ylabel(f"{title} perplexity")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M: perplexity against bytes (protocol windows)")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()
