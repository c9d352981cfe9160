"""One quality table from the protocol runs' JSON files (no number typed by hand).

    python benchmarks/results_grid.py [docs/results/core.json docs/results/activation.json ...]

Every file is a results JSON written by `svdkit bench` / `benchmarks/protocol.py` on the same protocol
(same calibration windows, same evaluation windows). Cells that appear in several files must agree
(the runs are deterministic); the table keeps the first and says where it came from. Prints markdown:
one row per cell (method, allocation, update, sequential, rank multiple: files written before
--rank-multiple existed hold exact ranks, i.e. 1), WikiText-2 and PTB perplexity per ratio; then a
second table of the generation scores (repeated 3-grams, distinct-2) of the cells that have them (a run
with `svdkit bench --no-perplexity` adds them to cells whose perplexity another file holds; rows are keyed
on the rank multiple too, so for the exact-rank rows of the older files that run needs --rank-multiple 1);
a third table of the Python-docs perplexity and the healing seconds of the cells that have them (seconds are
not compared between files: the first file's are shown).
A healed cell's row also names the healers' options that differ from today's defaults (`kd.lr=2e-05`), read
from its `heal_config`, or from HEALED for files written before cells recorded it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from svdkit.heal import HEALERS

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
    "docs/results/heal_kd_lr/results.json",
    "docs/results/heal_kd_lr_46/results.json",
    "docs/results/heal_soco/results.json",
    "docs/results/soco_guard/results.json",
    "docs/results/generation/results.json",
    "docs/results/generation_fwsvd/results.json",
]
RATIOS = (0.2, 0.4, 0.6)
SKIP = {("v2.json", ("svd-llm", "uniform", "", "lstsq", True, 1))}
"""the two-stream update before the staged pass (a since-fixed defect, kept in v2.json as a record)"""
HEALED = {
    "heal/results.json": {"kd": {"lr": 2e-5}},
    "heal_soco/results.json": {"kd": {"lr": 2e-5}},
    "heal_kd_lr/results.json": {"kd": {"lr": 1e-4}},
}
"""what the healed cells of files written before `heal_config` ran with, where today's defaults differ or might
(kd's learning rate was 2e-5 until 2026-12-04; the other options had today's defaults)"""
NOT_SETTINGS = {"log"}
"""healer options that name where a run writes, not how it heals"""


def heal_options(c: dict, source: str) -> str:
    """The healers' options of cell `c` that differ from today's defaults (or no longer exist), as ``kd.lr=2e-05``
    ('' if none)."""
    config = c.get("heal_config", HEALED.get(source))
    if config is None:
        raise SystemExit(f"{source}: a healed cell without heal_config; say in HEALED what it ran with")
    changed = []
    for name, options in config.items():
        default = asdict(HEALERS.get(name).config_cls())
        kept = {k: v for k, v in options.items() if k not in NOT_SETTINGS}
        changed += [f"{name}.{k}={v}" for k, v in kept.items() if k not in default or v != default[k]]
    return ",".join(changed)


def label(c: dict, multiple: int = 1, source: str = "") -> tuple:
    """A cell's row: method (with its healing and the healers' non-default options), allocation, its options,
    update, sequential, rank multiple (1 before it existed)."""
    opts = c.get("allocation_options") or {}
    alloc = c.get("allocation") or "uniform"
    heal = c.get("heal") if c.get("heal") not in (None, "none") else ""
    changed = heal_options(c, source) if heal else ""
    return (
        c["method"] + (f"+heal:{heal}" if heal else "") + (f" ({changed})" if changed else ""),
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
MORE = ("pydoc", "healing_s")
KINDS = {"ppl": PPL, "gen": GEN, "more": MORE}
TIMES = {"healing_s"}
"""seconds differ from run to run: a cell's first file gives them"""


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
    for kind, keys in KINDS.items():
        for key in keys:
            if c.get(key) is None or (key in TIMES and not c[key]):  # 0 s: a cell that does not heal
                continue
            if key in old and key not in TIMES and _differs(c[key], old[key]):
                raise SystemExit(f"{f}: {row['key']} at {c['ratio']}: {key} disagrees with {row['sources']}")
            if key not in old:
                old[key] = c[key]
                sources = row["sources"].setdefault(kind, [])
                if _source(f) not in sources:
                    sources.append(_source(f))


def _dense(files: list[str]) -> dict:
    """The dense row: every file's dense model must give the same perplexity and the same generation scores
    (where both files measured them: the same model on the same text), and the same model and window."""
    dense: dict = {}
    for f in files:
        report = json.loads(Path(f).read_text())
        d = {**report["dense"], "model": report.get("model"), "seqlen": report.get("seqlen")}
        for key in ("model", "seqlen", *PPL, *GEN, "pydoc"):
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
            key = label(c, report.get("rank_multiple", 1), _source(f))
            if (Path(f).name, key) not in SKIP:
                _merge(rows.setdefault(key, {"key": key, "sources": {}, "cells": {}}), c, f)
    dense = _dense(files)
    ppl = _table(rows, dense, PPL, ("WikiText-2", "PTB"), "ppl", fmt)
    gen = _table(rows, dense, GEN, ("rep. 3-grams", "distinct-2"), "gen", lambda x: "" if x is None else f"{x:.3f}")
    more = _table(rows, dense, MORE, ("Python docs", "healing s"), "more", fmt)
    return "\n".join([*ppl, "", *gen, "", *more])


if __name__ == "__main__":
    print(main(sys.argv[1:] or DEFAULT))
