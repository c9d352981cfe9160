"""One quality table from the protocol runs' JSON files (no number typed by hand).

    python benchmarks/results_grid.py [docs/results/core.json docs/results/activation.json ...]

Every file is a results JSON written by `svdkit bench` / `benchmarks/protocol.py` on the same protocol
(same calibration windows, same evaluation windows). Cells that appear in several files must agree
(the runs are deterministic); the table keeps the first and says where it came from. Prints markdown:
one row per cell (method, allocation, update, sequential, rank multiple: files written before
--rank-multiple existed hold exact ranks, i.e. 1), WikiText-2 and PTB perplexity per ratio.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DEFAULT = [
    "docs/results/core.json",
    "docs/results/activation.json",
    "docs/results/update.json",
    "docs/results/sequential.json",
    "docs/results/v2.json",
    "docs/results/seq_update/results.json",
    "docs/results/soco.json",
    "docs/results/speed/results.json",
    "docs/results/heal/results.json",
    "docs/results/heal_soco/results.json",
]
RATIOS = (0.2, 0.4, 0.6)
SKIP = {("v2.json", ("svd-llm", "uniform", "", "lstsq", True, 1))}
"""the two-stream update before the staged pass (a since-fixed defect, kept in v2.json as a record)"""


def label(c: dict, multiple: int = 1) -> tuple:
    """A cell's row: method, allocation, its options, update, sequential, rank multiple (1 before it existed)."""
    opts = c.get("allocation_options") or {}
    alloc = c.get("allocation") or "uniform"
    heal = c.get("heal") or ""
    return (
        c["method"] + (f"+heal:{heal}" if heal else ""),
        alloc,
        ",".join(f"{k}={v}" for k, v in opts.items()),
        c.get("update") or "none",
        bool(c.get("sequential")),
        multiple,
    )


def fmt(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.2f}" if x < 1e4 else f"{x:.2g}"


def main(files: list[str]) -> str:
    rows: dict[tuple, dict] = {}
    dense = None
    for f in files:
        report = json.loads(Path(f).read_text())
        if dense is None:
            dense = report["dense"]
        elif abs(report["dense"]["wikitext2"] - dense["wikitext2"]) > 1e-6:
            raise SystemExit(f"{f}: a different dense perplexity, so not the same protocol")
        for c in report["cells"]:
            key = label(c, report.get("rank_multiple", 1))
            if (Path(f).name, key) in SKIP:
                continue
            source = Path(f).name if Path(f).name != "results.json" else f"{Path(f).parent.name}/results.json"
            row = rows.setdefault(key, {"source": source, "cells": {}})
            old = row["cells"].get(c["ratio"])
            if old is not None and abs(old["wikitext2"] - c["wikitext2"]) > 1e-6 * old["wikitext2"]:
                raise SystemExit(f"{f}: {key} at {c['ratio']} disagrees with {row['source']}")
            row["cells"].setdefault(c["ratio"], c)
    lines = [
        "| method | allocation | update | WikiText-2 0.2 | 0.4 | 0.6 | PTB 0.2 | 0.4 | 0.6 | from |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | | | {fmt(dense['wikitext2'])} | | | {fmt(dense['ptb'])} | | | |",
    ]
    for (method, alloc, opts, update, seq, multiple), row in rows.items():
        cells = row["cells"]
        wiki = [fmt(cells[r]["wikitext2"]) if r in cells else "" for r in RATIOS]
        ptb = [fmt(cells[r]["ptb"]) if r in cells else "" for r in RATIOS]
        how = alloc + (f" ({opts})" if opts else "") + (f", ranks in multiples of {multiple}" if multiple > 1 else "")
        upd = " + ".join(x for x in (update if update != "none" else "", "sequential" if seq else "") if x)
        lines.append(f"| {method} | {how} | {upd} | {' | '.join(wiki)} | {' | '.join(ptb)} | {row['source']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(sys.argv[1:] or DEFAULT))
