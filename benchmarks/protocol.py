"""Run the fixed protocol (../shared/PROTOCOL.md) for given methods and ratios; write JSON and markdown.

    python benchmarks/protocol.py --methods svd svd-llm asvd@sensitivity --ratios 0.2 0.4 0.6 --out docs/results/core

A cell spec is METHOD[@ALLOCATION[:KEY=VALUE,...]][+lstsq][+seq]: an allocation strategy after '@'
(default uniform) with its options after ':', '+lstsq' for the least-squares update of B, '+seq' for
sequential calibration (each layer's statistics from the compressed layers before it; such cells run
their own calibration pass, with '+lstsq' a two-stream one). Otherwise one calibration pass over the
dense model (32 windows of 2048 WikiText-2 test tokens at seeded offsets from 150000) collects every
input statistic the cells need, and one gradient pass the Fisher information if a method needs it;
they serve every method, ratio and allocation. Each cell compresses a fresh copy of the dense model
and evaluates WikiText-2 (first 16 windows of 2048) and PTB validation (first 8 windows of 2048).
The JSON is rewritten after every cell and a rerun with the same --out skips the finished cells.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

import svdkit
from svdkit.allocation import get_allocator
from svdkit.calibration import collect_statistics
from svdkit.data import calibration_windows, load_text, tokenize
from svdkit.gradients import GRADIENT_STATISTICS
from svdkit.methods import get_method
from svdkit.models import find_architecture, resolve_device

HERE = Path(__file__).resolve().parent


def prefill_tokens_per_second(model, ids: torch.Tensor, repeats: int = 3) -> float:
    """Median tokens/s of one forward over a (1, seqlen) window, after one warm-up."""
    times = []
    with torch.no_grad():
        model(input_ids=ids[None], use_cache=False)
        for _ in range(repeats):
            t = time.perf_counter()
            model(input_ids=ids[None], use_cache=False)
            times.append(time.perf_counter() - t)
    return ids.numel() / statistics.median(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate(model, wiki, ptb, args) -> dict:
    w = svdkit.perplexity(model, None, wiki, seqlen=args.seqlen, max_windows=args.eval_windows, progress=False)
    p = svdkit.perplexity(model, None, ptb, seqlen=args.seqlen, max_windows=args.ptb_windows, progress=False)
    return {
        "wikitext2": w.ppl,
        "ptb": p.ppl,
        "params": w.params,
        "prefill_tok_s": prefill_tokens_per_second(model, wiki[: args.seqlen]),
    }


def fmt(x: float) -> str:
    return f"{x:.2f}" if x < 1e4 else f"{x:.3g}"


def markdown(report: dict) -> str:
    dense = report["dense"]
    lines = [
        f"# Protocol results: {report['model']}",
        "",
        f"- command: `{report['command']}`",
        f"- machine: {report['machine']}",
        f"- date: {report['date']}; svdkit {report['svdkit']}, torch {report['torch']}",
        f"- calibration: {report['calibration']['samples']} x {report['calibration']['seqlen']} WikiText-2 "
        f"test tokens at seeded offsets from {report['calibration']['offset']} (seed {report['calibration']['seed']}); "
        f"one pass shared by every cell: {report['calibration']['seconds']:.1f} s",
        f"- evaluation: WikiText-2 test, first {report['eval_windows']} windows of {report['seqlen']}; "
        f"PTB validation, first {report['ptb_windows']} windows",
        "",
        "| method | allocation | ratio | WikiText-2 ppl | PTB ppl | parameters | statistics s | allocation s "
        "| decomposition s | training s | total s | prefill tok/s | vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | | 0 | {fmt(dense['wikitext2'])} | {fmt(dense['ptb'])} | {dense['params']:,} | | | | | | "
        f"{dense['prefill_tok_s']:.0f} | 1.00x |",
    ]
    for c in report["cells"]:
        training = c.get("training_s", 0.0)
        total = c["statistics_s"] + c["allocation_s"] + c["decomposition_s"] + training
        lines.append(
            f"| {_label(c)} | {_alloc_label(c)} | {c['ratio']} | {fmt(c['wikitext2'])} | {fmt(c['ptb'])} | "
            f"{c['params']:,} | {c['statistics_s']:.0f} | {c['allocation_s']:.0f} | {c['decomposition_s']:.1f} | "
            f"{training:.0f} | {total:.0f} | {c['prefill_tok_s']:.0f} | "
            f"{c['prefill_tok_s'] / dense['prefill_tok_s']:.2f}x |"
        )
    passes = ", ".join(f"{k} {v:.0f} s" for k, v in report["calibration"].get("passes", {}).items())
    lines += [
        "",
        f"Statistics passes (shared by all cells): {passes or 'none'}. 'statistics s' is the time of the passes "
        "a cell's method needs ('inputs' collects every input statistic at once, so it is an upper bound for a "
        "method that needs only mean |x|); 'total s' adds allocation, decomposition and training (soco). "
        f"Prefill: one forward of {report['seqlen']} tokens, median of 3.",
        "",
        f"Peak resident memory of the whole run: {report['peak_rss_mb']:.0f} MB.",
        "",
    ]
    return "\n".join(lines)


def _merge(a: dict, b: dict) -> dict:
    """Per-module union of two statistics dicts (e.g. input statistics and Fisher information)."""
    from svdkit.statistics import LinearStats

    out = dict(a)
    for name, st in b.items():
        prev = out.get(name)
        out[name] = st if prev is None else LinearStats({**prev.values, **st.values}, prev.tokens, name)
    return out


def _label(cell: dict) -> str:
    extra = ("+lstsq" if cell.get("update", "none") == "lstsq" else "") + ("+seq" if cell.get("sequential") else "")
    return cell["method"] + extra


def _alloc_label(cell: dict) -> str:
    opts = cell.get("allocation_options") or {}
    extra = ", ".join(f"{k}={v}" for k, v in opts.items())
    return cell["allocation"] + (f" ({extra})" if extra else "")


def _key(cell: dict) -> tuple:
    return (
        cell["method"],
        cell.get("allocation", "uniform"),
        cell["ratio"],
        cell.get("update", "none"),
        bool(cell.get("sequential", False)),
        json.dumps(cell.get("allocation_options") or {}, sort_keys=True),
    )


def parse_spec(spec: str) -> tuple[str, str, str, bool, dict]:
    """'svd-llm@v2:strength=0.5+lstsq+seq' -> (method, allocation, update, sequential, allocation options)."""
    head, *flags = spec.split("+")
    unknown = set(flags) - {"lstsq", "seq"}
    if unknown:
        sys.exit(f"unknown flag(s) {sorted(unknown)} in '{spec}': use +lstsq and/or +seq")
    head, _, opts = head.partition(":")
    method, _, allocation = head.partition("@")
    return method, allocation or "uniform", "lstsq" if "lstsq" in flags else "none", "seq" in flags, parse_options(opts)


def parse_options(text: str) -> dict:
    """'rule=power,strength=0.5' -> {'rule': 'power', 'strength': 0.5} (values read as JSON when they parse)."""
    options = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _alloc_options(allocation: str, args) -> dict:
    if allocation != "sensitivity":
        return {}
    opts = {"windows": args.sensitivity_windows, "seqlen": args.sensitivity_seqlen}
    return {k: v for k, v in opts.items() if v is not None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", nargs="+", default=["svd", "svd-llm"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-offset", type=int, default=150000)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--ptb-windows", type=int, default=8)
    p.add_argument("--sensitivity-windows", type=int, default=None, help="sensitivity allocation: windows")
    p.add_argument("--sensitivity-seqlen", type=int, default=None, help="sensitivity allocation: tokens per window")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(HERE.parent / "results" / "protocol"), help="path prefix of .json/.md")
    args = p.parse_args()

    data = Path(args.data_dir)
    dev = resolve_device(args.device)
    model, tok = svdkit.load_model(args.model)
    model.to(dev)
    wiki = tokenize(tok, load_text(data / "wikitext-2-raw" / "wiki.test.raw"))
    ptb = tokenize(tok, load_text(data / "ptb" / "ptb.valid.txt"))
    print(f"WikiText-2 test: {wiki.numel():,} tokens; PTB validation: {ptb.numel():,} tokens", flush=True)

    report = {
        "model": args.model,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs ({platform.processor() or platform.platform()}), "
        f"device {dev}, torch threads {torch.get_num_threads()}",
        "date": time.strftime("%Y-%m-%d"),
        "svdkit": svdkit.__version__,
        "torch": torch.__version__,
        "seqlen": args.seqlen,
        "eval_windows": args.eval_windows,
        "ptb_windows": args.ptb_windows,
        "calibration": {
            "samples": args.calib_samples,
            "seqlen": args.seqlen,
            "offset": args.calib_offset,
            "seed": args.seed,
            "seconds": 0.0,
        },
        "cells": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        same = ("model", "seqlen", "eval_windows", "ptb_windows")
        old_calib = {k: v for k, v in old.get("calibration", {}).items() if k not in ("seconds", "passes")}
        new_calib = {k: v for k, v in report["calibration"].items() if k not in ("seconds", "passes")}
        if all(old.get(k) == report[k] for k in same) and old_calib == new_calib:
            report["dense"] = old.get("dense")
            report["calibration"]["passes"] = old.get("calibration", {}).get("passes", {})
            done = {_key(c): c for c in old.get("cells", [])}
            print(f"resuming: {len(done)} finished cells in {out.with_suffix('.json')}", flush=True)
        else:
            sys.exit(f"{out.with_suffix('.json')} holds results of other settings: choose another --out")
    if not report.get("dense"):
        report["dense"] = evaluate(model, wiki, ptb, args)
    print(f"dense: {report['dense']}", flush=True)

    cells = []
    for spec in args.methods:
        method, allocation, update, sequential, options = parse_spec(spec)
        for ratio in args.ratios:
            cells.append((method, allocation, ratio, update, sequential, json.dumps(options, sort_keys=True)))
    todo = [c for c in cells if c not in done]
    needs = set()
    for m, alloc, _, update, sequential, _ in todo:
        if not sequential:
            needs |= get_method(m).requires | get_allocator(alloc).requires | ({"gram"} if update == "lstsq" else set())
    stats = None
    passes = report["calibration"].setdefault("passes", {})
    windows = calibration_windows(wiki, args.calib_samples, args.seqlen, args.calib_offset, args.seed)
    arch = find_architecture(model)
    for kind, group in (("inputs", needs - GRADIENT_STATISTICS), ("fisher", needs & GRADIENT_STATISTICS)):
        if group:
            t = time.perf_counter()
            part = collect_statistics(model, arch, windows, group, dev)
            passes[kind] = time.perf_counter() - t
            stats = part if stats is None else _merge(stats, part)
    report["calibration"]["seconds"] = sum(passes.values())

    def save() -> None:
        report["peak_rss_mb"] = peak_rss_mb()
        report["cells"] = [done[c] for c in cells if c in done] + [c for k, c in done.items() if k not in cells]
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")

    for method, allocation, ratio, update, sequential, options in todo:
        work = copy.deepcopy(model)
        r = svdkit.compress(
            work,
            tok,
            method=method,
            ratio=ratio,
            calib=wiki,
            calib_samples=args.calib_samples,
            calib_seqlen=args.seqlen,
            calib_offset=args.calib_offset,
            seed=args.seed,
            device=dev,
            statistics=None if sequential else stats,
            progress=allocation != "uniform" or sequential,
            allocation=allocation,
            allocation_options={**_alloc_options(allocation, args), **json.loads(options)},
            update=update,
            sequential=sequential,
        )
        req = get_method(method).requires | get_allocator(allocation).requires
        req |= {"gram"} if update == "lstsq" else set()
        shared = (passes.get("inputs", 0.0) if req - GRADIENT_STATISTICS else 0.0) + (
            passes.get("fisher", 0.0) if req & GRADIENT_STATISTICS else 0.0
        )
        cell = {
            "method": method,
            "allocation": allocation,
            "allocation_options": json.loads(options),
            "ratio": ratio,
            "update": update,
            "sequential": sequential,
            "statistics_s": r.timings["calibration"] if sequential else shared,
            "allocation_s": r.timings["allocation"],
            "decomposition_s": r.timings["decomposition"],
            "training_s": r.timings.get("training", 0.0),
            "allocation_report": r.allocation,
            **({"training": r.training} if r.training else {}),
            "ranks": r.ranks,
            **evaluate(work, wiki, ptb, args),
        }
        done[_key(cell)] = cell
        print({k: v for k, v in cell.items() if k != "ranks"}, flush=True)
        save()
        del work
    save()
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
