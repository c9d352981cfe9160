"""The scorecard table of several bench runs, side by side by calibration (no number typed by hand).

    python benchmarks/scorecard_table.py docs/results/scorecard/wikitext2/results.json \
        docs/results/scorecard/mixture/results.json docs/results/heal_kd_lr/results.json \
        docs/results/heal_kd_lr_46/results.json --plot docs/results/scorecard/tradeoff.png

Every file is a results JSON of `svdkit bench` on the protocol (the same test windows; the calibration text
is the run's own, read from the file: a file written before `--calib` existed calibrated on WikiText-2; a
healed cell's healing text where `--heal-calib` gave one).
Prints markdown: one row per cell and calibration with the three domains' perplexity, generality (the
geometric mean of ppl / dense ppl), the five zero-shot accuracies where the run scored them, their mean and,
beside it, the mean of the four tasks other than BoolQ: dense SmolLM2-135M answers BoolQ below its majority
class (it mostly says "no"), so a compressed model that drifts toward "yes" gains up to 20 points there
without understanding more, which the five-task mean hides. `--plot PNG` draws WikiText-2 perplexity against
generality, one point per cell, a line joining a cell's calibrations (labelled calibration / healing text).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from svdkit.measure.scorecard import DOMAINS, generality

TASKS = ("arc_easy", "piqa", "hellaswag", "winogrande", "boolq")


def cells(paths: list[Path]) -> tuple[dict, list[tuple[str, dict]]]:
    """The first file's dense row and every (calibration, cell) with the three domains."""
    dense, rows = None, []
    for path in paths:
        report = json.loads(path.read_text())
        dense = dense or report["dense"]
        calib = report.get("calibration", {}).get("source", "wikitext2")
        heal = report.get("calibration", {}).get("heal_calib")
        rows += [
            (calib if heal is None or c.get("heal", "none") == "none" else f"{calib}; healing: {heal}", c)
            for c in report["cells"]
            if all(d in c for d in DOMAINS)
        ]
    if dense is None:
        raise SystemExit("no results file given")
    return dense, rows


def rank(calib: str) -> tuple:
    """WikiText-2 (the protocol's) first, then WikiText-2 healed on another text, then the rest."""
    return (calib != "wikitext2", not calib.startswith("wikitext2;"), calib)


def label(cell: dict) -> str:
    return cell["method"] + ("" if cell.get("heal", "none") == "none" else f"+heal:{cell['heal']}")


def _means(z: dict | None, dense_z: dict) -> tuple[str, str]:
    if z is None:
        return "", ""
    four = [sum(x["tasks"][t]["value"] for t in TASKS[:4]) / 4 for x in (z, dense_z)]
    return (
        f"{100 * z['mean']:.1f} ({100 * (z['mean'] - dense_z['mean']):+.1f})",
        f"{100 * four[0]:.1f} ({100 * (four[0] - four[1]):+.1f})",
    )


def row(name: str, calib: str, ratio: float, cell: dict, dense: dict) -> str:
    z = cell.get("zero_shot")
    accs = " | ".join(f"{100 * z['tasks'][t]['value']:.1f}" if z else "" for t in TASKS)
    mean, four = _means(z, dense["zero_shot"])
    ppl = " | ".join(f"{cell[d]:.2f}" for d in DOMAINS)
    return (
        f"| {name} | {calib} | {ratio} | {ppl} | {generality(cell, dense):.2f} | {accs} | {mean} | {four} | "
        f"{cell.get('repeated_3grams', float('nan')):.3f} |"
    )


def table(dense: dict, rows: list[tuple[str, dict]]) -> str:
    head = (
        "| cell | calibration | ratio | WikiText-2 | PTB | Python docs | generality | ARC-E acc_norm | PIQA acc_norm "
        "| HellaSwag acc_norm | WinoGrande acc | BoolQ acc | mean of 5 (vs dense) | mean of 4, no BoolQ (vs dense) "
        "| rep. 3-grams |"
    )
    lines = [head, "|" + "---|" * 15, row("dense", "", 0, dense, dense)]
    order = sorted(rows, key=lambda r: (label(r[1]), r[1]["ratio"], rank(r[0])))
    lines += [row(label(c), calib, c["ratio"], c, dense) for calib, c in order]
    return "\n".join(lines)


def plot(dense: dict, rows: list[tuple[str, dict]], path: Path) -> None:
    """WikiText-2 ppl against generality, a line per cell joining its calibrations, log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 5.0))
    groups: dict[tuple[str, float], list[tuple[str, dict]]] = {}
    for calib, c in rows:
        groups.setdefault((label(c), c["ratio"]), []).append((calib, c))
    for (name, ratio), members in sorted(groups.items()):
        members.sort(key=lambda m: rank(m[0]))
        xs = [c["wikitext2"] for _, c in members]
        ys = [generality(c, dense) for _, c in members]
        (line,) = ax.plot(xs, ys, marker="o", label=f"{name} {ratio}")
        for (calib, _), x, y in zip(members, xs, ys, strict=True):
            short = " / ".join("WikiText-2" if t == "wikitext2" else "mixture" for t in calib.split("; healing: "))
            ax.annotate(short, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=line.get_color())
    ax.axhline(1.5, color="grey", linestyle=":", label="goal at 0.2: generality 1.5")
    ax.set(xlabel="WikiText-2 test perplexity (dense 20.82)")
    ax.set(ylabel="generality (geometric mean of ppl / dense over 3 domains)")
    ax.legend(fontsize=7)
    ax.set_title("Calibration text: in-domain perplexity against generality (SmolLM2-135M)", fontsize=10)
    save_log_plot(fig, ax, path)


def save_log_plot(fig, ax, path: Path) -> None:
    """Both axes logarithmic, labelled in plain numbers (1, 2, 3, 5 per decade), a grid; the PNG written."""
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    ax.set(xscale="log", yscale="log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
        axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        axis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="results.json files of svdkit bench")
    p.add_argument("--plot", type=Path, help="also draw WikiText-2 ppl against generality into this PNG")
    a = p.parse_args()
    dense, rows = cells(a.results)
    print(table(dense, rows))
    if a.plot is not None:
        plot(dense, rows, a.plot)


if __name__ == "__main__":
    main()
