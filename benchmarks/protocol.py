"""Run the fixed protocol (../shared/PROTOCOL.md) for given methods and ratios; write JSON and markdown.

    python benchmarks/protocol.py --methods svd svd-llm asvd@sensitivity --ratios 0.2 0.4 0.6 --out docs/results/core

The same harness as ``svdkit bench`` (:mod:`svdkit.bench.grid`: cell syntax, shared calibration pass,
measurements, resuming), kept for the commands recorded in docs/results: ``--out`` is a path prefix
(PREFIX.json and PREFIX.md), the text comes from ../shared/data unless --data-dir says otherwise,
plots are written only with --plots DIR, and the ranks are exact (--rank-multiple 1) unless
--rank-multiple says otherwise, as in the runs recorded before that option existed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from svdkit.bench.grid import run_bench
from svdkit.bench.report import markdown
from svdkit.cli.bench import add_bench_arguments, bench_config
from svdkit.errors import SvdkitError

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bench_arguments(p)
    # exact ranks unless asked: the recorded commands predate --rank-multiple (svdkit bench rounds to 8)
    p.set_defaults(data_dir=str(HERE.parent.parent / "shared" / "data"), rank_multiple=1)
    p.add_argument("--out", default=str(HERE.parent / "results" / "protocol"), help="path prefix of .json/.md")
    p.add_argument("--plots", default=None, metavar="DIR", help="also write the PNG plots into DIR")
    args = p.parse_args()
    if args.plots is None:
        args.no_plots = True
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    try:
        report = run_bench(
            bench_config(args), out.with_suffix(".json"), out.with_suffix(".md"), args.plots, command=command
        )
    except SvdkitError as e:
        sys.exit(f"protocol.py: error: {e}")
    print(markdown(report))


if __name__ == "__main__":
    main()
