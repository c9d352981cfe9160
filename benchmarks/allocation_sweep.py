"""Choose allocation options on a validation slice that neither calibration nor the protocol's evaluation uses.

    python benchmarks/allocation_sweep.py --method svd-llm-v2 --allocation v2 --ratios 0.2 0.4 \\
        --variant rule=log,strength=1 --variant rule=power,strength=0.25 --out docs/results/v2_sweep

Calibration is the protocol's (32 x 2048 WikiText-2 test tokens at seeded offsets from 150000); the
validation slice is WikiText-2 test tokens [40960, 40960 + 8 x 2048), after the protocol's evaluation
windows (the first 16 x 2048) and before any calibration offset. Uniform allocation is always included.
One statistics pass serves every variant; the truncation losses of each ratio are computed once.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import svdkit
from svdkit.allocators import get_allocator
from svdkit.bench.cells import parse_options
from svdkit.calibration.collect import collect_statistics
from svdkit.core.architecture import find_architecture
from svdkit.core.device import resolve_device
from svdkit.methods import get_method
from svdkit.sources.text import calibration_windows, load_text, tokenize

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="svd-llm-v2")
    p.add_argument("--allocation", default="v2")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4])
    p.add_argument("--variant", action="append", default=[], help="allocation options, e.g. rule=power,strength=0.25")
    p.add_argument(
        "--method-variant",
        action="append",
        default=[],
        help="method options tried with --allocation, e.g. steps=60,lr=0.05 (for soco: replaces the allocation rows)",
    )
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--val-offset", type=int, default=40960)
    p.add_argument("--val-windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--rank-multiple",
        type=int,
        default=1,
        help="rank alignment (1, exact ranks: what the published runs used; svdkit's default is 8)",
    )
    p.add_argument("--out", default=str(HERE.parent / "docs" / "results" / "allocation_sweep"))
    args = p.parse_args()

    dev = resolve_device(args.device)
    model, tok = svdkit.load_model(args.model)
    model.to(dev)
    wiki = tokenize(tok, load_text(Path(args.data_dir) / "wikitext-2-raw" / "wiki.test.raw"))
    val = wiki[args.val_offset : args.val_offset + args.val_windows * args.seqlen]
    windows = calibration_windows(wiki, 32, args.seqlen, 150000, 0)
    needs = get_method(args.method).requires | get_allocator(args.allocation).requires
    t = time.perf_counter()
    stats = collect_statistics(model, find_architecture(model), windows, needs, dev)
    stats_s = time.perf_counter() - t

    allocator = get_allocator(args.allocation)
    original = allocator.summarize
    cache: dict[tuple, dict] = {}

    def cached(weights, statistics, config, device):  # the spectra depend on rel_floor only: compute them once
        key = (tuple(weights), getattr(config, "rel_floor", None))
        if key not in cache:
            cache[key] = original(weights, statistics, config, device)
        return cache[key]

    if original is not None:
        object.__setattr__(allocator, "summarize", cached)  # the registered (frozen) allocator, for this run

    def ppl(m) -> float:
        return svdkit.perplexity(m, None, val, seqlen=args.seqlen, progress=False).ppl

    report = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, device {dev}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "validation": f"WikiText-2 test tokens [{args.val_offset}, {args.val_offset + val.numel()})",
        "statistics_s": stats_s,
        "dense": ppl(model),
        "rows": [],
    }
    if args.method_variant:
        variants = [(args.allocation, {}, parse_options(v)) for v in args.method_variant]
    else:
        variants = [("uniform", {}, {})] + [(args.allocation, parse_options(v), {}) for v in args.variant]
    try:
        for ratio in args.ratios:
            for allocation, options, method_options in variants:
                work = copy.deepcopy(model)
                r = svdkit.compress(
                    work,
                    tok,
                    method=args.method,
                    ratio=ratio,
                    calib=wiki,  # the same windows again, for a method that trains on them (soco)
                    calib_offset=150000,
                    statistics=stats,
                    device=dev,
                    progress=False,
                    allocation=allocation,
                    allocation_options=options,
                    method_options=method_options,
                    rank_multiple=args.rank_multiple,
                )
                row = {
                    "ratio": ratio,
                    "allocation": allocation,
                    "options": {**options, **method_options},
                    "ppl": ppl(work),
                    "params": r.params,
                    "ratio_range": r.allocation.get("ratio_range"),
                }
                if r.training:
                    row["training"] = r.training.as_dict()
                    row["training_s"] = r.timings.get("training")
                report["rows"].append(row)
                print({k: v for k, v in row.items() if k not in ("ratio_range", "training")}, flush=True)
                del work
    finally:
        object.__setattr__(allocator, "summarize", original)
    lines = [
        "# Allocation sweep on a validation slice",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine']}; date {report['date']}",
        f"- method {args.method}; calibration: the protocol's 32 x {args.seqlen} tokens; validation: "
        f"{report['validation']} (dense ppl {report['dense']:.2f})",
        "",
        "| ratio | allocation | options | validation ppl | parameters |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        opts = ", ".join(f"{k}={v}" for k, v in row["options"].items())
        lines.append(f"| {row['ratio']} | {row['allocation']} | {opts} | {row['ppl']:.2f} | {row['params']:,} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
