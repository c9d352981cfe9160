"""One quality table from the protocol runs' JSON files (no number typed by hand).

    python benchmarks/results_grid.py [docs/results/core.json docs/results/activation.json ...]

Every file is a results JSON written by `svdkit bench` / `benchmarks/protocol.py` on the same protocol
(same calibration windows, same evaluation windows). Cells that appear in several files must agree
(the runs are deterministic); the table keeps the first and says where it came from. Prints markdown:
one row per cell (method, allocation, update, sequential, rank multiple: files written before
--rank-multiple existed hold exact ranks, i.e. 1), WikiText-2 and PTB perplexity per ratio; then a
second table of the generation scores (repeated 3-grams, distinct-2) of the cells that have them (a run
with `svdkit bench --no-perplexity` adds them to cells whose perplexity another file holds; rows are keyed
on the rank multiple too, so for the exact-rank rows of the older files that run needs --rank-multiple 1).
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
    "docs/results/soco_guard/results.json",
    "docs/results/generation/results.json",
]
RATIOS = (0.2, 0.4, 0.6)
SKIP = {("v2.json", ("svd-llm", "uniform", "", "lstsq", True, 1))}
"""the two-stream update before the staged pass (a since-fixed defect, kept in v2.json as a record)"""


def label(c: dict, multiple: int = 1) -> tuple:
    """A cell's row: method, allocation, its options, update, sequential, rank multiple (1 before it existed)."""
    opts = c.get("allocation_options") or {}
    alloc = c.get("allocation") or "uniform"
    heal = c.get("heal") if c.get("heal") not in (None, "none") else ""
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


PPL = ("wikitext2", "ptb")
GEN = ("repeated_3grams", "distinct_2")


def _source(f: str) -> str:
    return Path(f).name if Path(f).name != "results.json" else f"{Path(f).parent.name}/results.json"


def _differs(new, first) -> bool:
    """Two records of one measurement disagree: numbers by more than 1e-6 relative, anything else at all."""
    if isinstance(new, int | float) and isinstance(first, int | float):
        return abs(new - first) > 1e-6 * max(abs(first), 1e-12)
    return new != first


def _merge(row: dict, c: dict, f: str) -> None:
    """Add cell `c` of file `f` to `row`: metrics a ratio already has must agree; new ones are added."""
    old = row["cells"].setdefault(c["ratio"], {})
    for key in (*PPL, *GEN):
        if c.get(key) is None:
            continue
        if key in old and _differs(c[key], old[key]):
            raise SystemExit(f"{f}: {row['key']} at {c['ratio']}: {key} disagrees with {row['sources']}")
        if key not in old:
            old[key] = c[key]
            sources = row["sources"].setdefault("ppl" if key in PPL else "gen", [])
            if _source(f) not in sources:
                sources.append(_source(f))


def _dense(files: list[str]) -> dict:
    """The dense row: every file's dense model must give the same perplexity and the same generation scores
    (where both files measured them: the same model on the same text), and the same model and window."""
    dense: dict = {}
    for f in files:
        report = json.loads(Path(f).read_text())
        d = {**report["dense"], "model": report.get("model"), "seqlen": report.get("seqlen")}
        for key in ("model", "seqlen", *PPL, *GEN):
            if d.get(key) is None:
                continue
            if key in dense and _differs(d[key], dense[key]):
                raise SystemExit(f"{f}: another dense {key} ({d[key]} vs {dense[key]}), so not the same protocol")
            dense.setdefault(key, d[key])
    return dense


def _row(method, alloc, opts, update, seq, multiple) -> tuple[str, str, str]:
    how = alloc + (f" ({opts})" if opts else "") + (f", ranks in multiples of {multiple}" if multiple > 1 else "")
    upd = " + ".join(x for x in (update if update != "none" else "", "sequential" if seq else "") if x)
    return method, how, upd


def _table(rows: dict, dense: dict, keys: tuple[str, str], titles: tuple[str, str], kind: str, f) -> list[str]:
    lines = [
        f"| method | allocation | update | {titles[0]} 0.2 | 0.4 | 0.6 | {titles[1]} 0.2 | 0.4 | 0.6 | from |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | | | {f(dense.get(keys[0]))} | | | {f(dense.get(keys[1]))} | | | |",
    ]
    for key, row in rows.items():
        if kind not in row["sources"]:
            continue
        cells = row["cells"]
        values = [f(cells[r].get(k)) if r in cells else "" for k in keys for r in RATIOS]
        lines.append(f"| {' | '.join(_row(*key))} | {' | '.join(values)} | {', '.join(row['sources'][kind])} |")
    return lines


def main(files: list[str]) -> str:
    """The perplexity table, then the generation table, of every cell in `files`."""
    rows: dict[tuple, dict] = {}
    for f in files:
        report = json.loads(Path(f).read_text())
        for c in report["cells"]:
            key = label(c, report.get("rank_multiple", 1))
            if (Path(f).name, key) not in SKIP:
                _merge(rows.setdefault(key, {"key": key, "sources": {}, "cells": {}}), c, f)
    dense = _dense(files)
    ppl = _table(rows, dense, PPL, ("WikiText-2", "PTB"), "ppl", fmt)
    gen = _table(rows, dense, GEN, ("rep. 3-grams", "distinct-2"), "gen", lambda x: "" if x is None else f"{x:.3f}")
    return "\n".join([*ppl, "", *gen])


if __name__ == "__main__":
    print(main(sys.argv[1:] or DEFAULT))
