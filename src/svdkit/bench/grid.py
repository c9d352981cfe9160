"""The same-protocol benchmark: a grid of methods x ratios x allocations on one model, one harness.

    svdkit bench --methods svd svd-llm svd-llm-v2@v2 soco --ratios 0.2 0.4 0.6 --out bench-smollm2

The protocol: calibration on 32 windows of 2048 WikiText-2 test tokens at seeded offsets from 150000;
evaluation on the first 16 windows of 2048 of WikiText-2 test and the first 8 of PTB validation. Another
calibration text (``--calib``, a spec of :mod:`svdkit.sources.mixture`, e.g. ``wikitext2:16,demo:8``, and
``--heal-calib`` for the healing cells) never touches the evaluation or validation windows: a named part
without a slice is drawn from the protocol's range of its text (:data:`PROTOCOL_RANGES`), and named texts
are the ones the bench loaded (``--data-dir``). A
cell spec is METHOD[@ALLOCATION[:KEY=VALUE,...]][+lstsq][+seq][+heal:NAME[,NAME][:NAME.KEY=VALUE,...]]: an
allocation strategy after '@' (default uniform) with its options after ':', '+lstsq' for the least-squares
update of B, '+seq' for sequential calibration (such cells run their own calibration pass), '+heal:block,kd'
for healing after the method (:mod:`svdkit.heal`, its time a column of its own; '+heal:kd:kd.epochs=2' with
options). Otherwise one calibration pass over
the dense model collects every input statistic the cells need (the Gram matrices do not depend on the
method), and one gradient pass the Fisher information if a method needs it; they serve every cell.
Each cell compresses a fresh copy of the dense model through the pipeline's plan and stages.

Measured per cell, dense alongside: perplexities (none with ``perplexity=False``, ``--no-perplexity``: for
generation scores of cells whose perplexity another run holds), generation scores, parameters,
compression time split into statistics, allocation, decomposition and training, peak resident memory
while compressing, prefill and decode throughput, weight bytes, the memory a prefill adds, and the saved
file size (:mod:`svdkit.measure.speed`).
Writes ``results.json`` (rewritten after every cell: an interrupted run resumes from the finished
cells), ``results.md`` and PNG plots (perplexity vs ratio, rank maps of non-uniform allocations, SoCo
training curves, singular spectra of a few matrices before and after whitening).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..allocators import get_allocator
from ..calibration.collect import collect_statistics
from ..calibration.gradients import GRADIENT_STATISTICS
from ..calibration.statistics import LinearStats
from ..core.architecture import find_architecture
from ..core.device import resolve_device
from ..core.lowrank import count_parameters
from ..core.ranks import check_ratio
from ..errors import SvdkitError
from ..measure.generation import generation_quality
from ..measure.scorecard import DOMAINS, ScorecardSettings, domain_perplexities, generality, zero_shot_scores
from ..measure.speed import measure, peak_rss_mb, reset_peak_rss
from ..methods import get_method
from ..pipeline.compress import run_plan
from ..pipeline.options import CalibrationSettings, CompressionOptions
from ..pipeline.plan import make_plan, statistics_needed
from ..sources.mixture import mixture_windows
from ..sources.models import load_model
from ..sources.text import load_text, tokenize
from ..version import __version__
from .cells import (
    VALIDATION,
    BenchConfig,
    CellSpec,
    as_cell,
    cell_key,
    finished_cells,
    parse_spec,
    protocol_spec,
    results_settings,
)
from .plots import write_plots
from .report import markdown

__all__ = ["run_bench"]


@dataclass
class _Setup:
    """The dense model, its tokenizer, the protocol's token streams and the device, loaded once."""

    model: Any
    tokenizer: Any
    wiki: torch.Tensor
    ptb: torch.Tensor
    device: torch.device
    pydoc: torch.Tensor | None = None
    """the third domain: Python's documentation text (calibrated on only before its last 16 windows)"""

    @property
    def texts(self) -> dict[str, torch.Tensor]:
        """The named texts loaded once, by source name, for the calibration specs."""
        named = {"wikitext2": self.wiki, "ptb": self.ptb, "demo": self.pydoc}
        return {k: v for k, v in named.items() if v is not None}


def _merge(a: dict, b: dict) -> dict:
    """Per-module union of two statistics dicts (e.g. input statistics and Fisher information)."""
    out = dict(a)
    for name, st in b.items():
        prev = out.get(name)
        out[name] = st if prev is None else LinearStats({**prev.values, **st.values}, prev.tokens, name)
    return out


def _texts(config: BenchConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    if config.data_dir is not None:
        data = Path(config.data_dir)
        sources = (data / "wikitext-2-raw" / "wiki.test.raw", data / "ptb" / "ptb.valid.txt")
        missing = [str(p) for p in sources if not p.is_file()]
        if missing:
            raise SvdkitError(
                f"the protocol's text is missing: {', '.join(missing)}; --data-dir must hold "
                "wikitext-2-raw/wiki.test.raw and ptb/ptb.valid.txt"
            )
    else:
        sources = ("wikitext2", "ptb")  # $SVDKIT_DATA, else Hugging Face datasets (network)
    return tokenize(tokenizer, load_text(sources[0])), tokenize(tokenizer, load_text(sources[1]))


def _evaluate(model, setup: _Setup, config: BenchConfig, reference=None) -> dict[str, Any]:
    out: dict[str, Any] = {"params": count_parameters(model)}
    if config.perplexity:
        out.update(_perplexities(model, setup, config))
    if config.zero_shot:
        settings = ScorecardSettings(limit=config.zero_shot)
        out["zero_shot"] = zero_shot_scores(model, setup.tokenizer, settings, data_dir=config.data_dir)
    ids = _generation_tokens(setup.wiki, config)
    if config.generation and len(ids) >= 64:
        g = generation_quality(model, ids, prompts=min(16, len(ids) // 64), device=setup.device)
        out.update({"repeated_3grams": g.repeated_3grams, "distinct_2": g.distinct_2})
    if config.speed:
        window = setup.wiki[: config.seqlen]
        out.update(measure(model, window, config.decode_tokens, repeats=config.repeats, reference=reference))
    return out


def _perplexities(model, setup: _Setup, config: BenchConfig) -> dict[str, float]:
    """The scorecard's domains: WikiText-2 test, PTB validation and (when loaded) the Python docs' last windows."""
    windows = {"wikitext2": config.eval_windows, "ptb": config.ptb_windows, "pydoc": config.pydoc_windows}
    tokens = {"wikitext2": setup.wiki, "ptb": setup.ptb, "pydoc": setup.pydoc}
    settings = ScorecardSettings(seqlen=config.seqlen, windows=windows)
    return domain_perplexities(model, {k: v for k, v in tokens.items() if v is not None}, settings)


def _generation_tokens(wiki: torch.Tensor, config: BenchConfig) -> torch.Tensor:
    """The generation prompts' text: the validation slice, or (a shorter text) what follows the evaluation windows."""
    if len(wiki) >= VALIDATION[1]:
        return wiki[VALIDATION[0] : VALIDATION[1]]
    return wiki[config.eval_windows * config.seqlen :] if len(wiki) > config.eval_windows * config.seqlen else wiki


def _load(config: BenchConfig, log) -> _Setup:
    dev = resolve_device(config.device)
    model, tok = load_model(config.model, dtype=config.dtype)
    model.to(dev)
    wiki, ptb = _texts(config, tok)
    pydoc = tokenize(tok, load_text("demo"))
    log(f"WikiText-2 test: {wiki.numel():,} tokens; PTB validation: {ptb.numel():,}; Python docs: {pydoc.numel():,}")
    return _Setup(model, tok, wiki, ptb, dev, pydoc)


def _new_report(config: BenchConfig, device: torch.device, command: str) -> dict[str, Any]:
    return {
        **results_settings(config),
        "command": command,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs ({platform.processor() or platform.platform()}), "
        f"device {device}, torch threads {torch.get_num_threads()}",
        "date": time.strftime("%Y-%m-%d"),
        "svdkit": __version__,
        "torch": torch.__version__,
        "cells": [],
    }


def _cell_options(spec: CellSpec, ratio: float, config: BenchConfig, setup: _Setup) -> CompressionOptions:
    """The pipeline's options for one cell (checked here, before any pass runs)."""
    options = {**config.allocation_options.get(spec.allocation, {}), **json.loads(spec.options)}
    loud = get_allocator(spec.allocation).per_matrix or spec.sequential or get_method(spec.method).training is not None
    loud = loud or spec.heal != "none"
    heal_text = spec.heal != "none" and config.heal_calib is not None
    return CompressionOptions(
        method=spec.method,
        ratio=ratio,
        allocation=spec.allocation,
        allocation_options=options,
        update=spec.update,
        sequential=spec.sequential,
        heal=spec.heal,
        heal_options=json.loads(spec.heal_options),
        rank_multiple=config.rank_multiple,
        device=setup.device,
        progress=loud,
        calibration=_bench_calibration(config),
        heal_calib=protocol_spec(config.heal_calib, config.calibration.offset) if heal_text else None,
    )


def _bench_calibration(config: BenchConfig) -> CalibrationSettings:
    """The calibration settings with the protocol's ranges on the parts that give none."""
    c = config.calibration
    return dataclasses.replace(c, source=protocol_spec(c.source, c.offset))


def _shared_statistics(setup: _Setup, config: BenchConfig, needs: set[str], passes: dict) -> dict | None:
    """One dense pass for the input statistics and one gradient pass for Fisher, as far as `needs` asks."""
    if not needs:
        return None
    c = _bench_calibration(config)
    windows = mixture_windows(
        c.source, c.samples, c.seqlen, c.offset, c.seed, setup.tokenizer, setup.model, setup.texts
    )
    arch = find_architecture(setup.model)
    stats = None
    for kind, group in (("inputs", needs - GRADIENT_STATISTICS), ("fisher", needs & GRADIENT_STATISTICS)):
        if group:
            t = time.perf_counter()
            part = collect_statistics(setup.model, arch, windows, group, setup.device)
            passes[kind] = time.perf_counter() - t
            stats = part if stats is None else _merge(stats, part)
    return stats


def _run_cell(spec: CellSpec, options: CompressionOptions, setup: _Setup, config: BenchConfig, stats, passes) -> dict:
    """Compress a fresh copy of the dense model with `options` and measure it: one result cell."""
    work = copy.deepcopy(setup.model)
    reset_peak_rss()
    plan = make_plan(work, options, None if spec.sequential else stats, setup.tokenizer)
    r = run_plan(plan, work, setup.tokenizer, texts=setup.texts)
    compress_rss = peak_rss_mb()
    shared = (passes.get("inputs", 0.0) if plan.needs - GRADIENT_STATISTICS else 0.0) + (
        passes.get("fisher", 0.0) if plan.needs & GRADIENT_STATISTICS else 0.0
    )
    return {
        "method": spec.method,
        "allocation": spec.allocation,
        "allocation_options": json.loads(spec.options),
        "ratio": options.ratio,
        "update": spec.update,
        "sequential": spec.sequential,
        "statistics_s": r.timings["calibration"] if spec.sequential else shared,
        "allocation_s": r.timings["allocation"],
        "decomposition_s": r.timings["decomposition"],
        "training_s": r.timings.get("training", 0.0),
        "heal": spec.heal,
        **({"heal_options": json.loads(spec.heal_options)} if spec.heal_options != "{}" else {}),
        "healing_s": r.timings.get("healing", 0.0),
        "compress_peak_rss_mb": compress_rss,
        "allocation_report": r.allocation,
        **({"training": r.training.as_dict()} if r.training else {}),
        **({"healing": {name: report.as_dict() for name, report in r.healing.items()}} if r.healing else {}),
        **({"heal_config": {h["name"]: h["config"] for h in work.config.svdkit["heal"]}} if r.healing else {}),
        "ranks": r.ranks,
        **_evaluate(work, setup, config, reference=setup.model),
    }


def _write(json_path: Path, report: dict, done: dict, keys: list) -> None:
    """results.json, atomically; the speed measurements reset the peak memory, so the largest seen is kept."""
    seen = [c.get("compress_peak_rss_mb") or 0.0 for c in done.values()]
    report["peak_rss_mb"] = max(report.get("peak_rss_mb") or 0.0, peak_rss_mb(), *seen)
    ordered = [done[k] for k in keys if k in done]
    report["cells"] = ordered + [c for k, c in done.items() if k not in keys]
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, json_path)


def run_bench(
    config: BenchConfig,
    json_path: str | os.PathLike,
    md_path: str | os.PathLike | None = None,
    plot_dir: str | os.PathLike | None = None,
    command: str = "",
    log=print,
) -> dict:
    """Run the grid of `config`, writing `json_path` after every cell, then `md_path` and the plots."""
    specs = [parse_spec(s) for s in config.cells]
    if not specs or not config.ratios:
        raise SvdkitError("the grid is empty: give at least one method and one ratio")
    ratios = [check_ratio(r) for r in config.ratios]
    json_path = Path(json_path)
    if not json_path.parent.is_dir():
        raise SvdkitError(f"cannot write results: folder '{json_path.parent}' does not exist")
    setup = _load(config, log)
    report = _new_report(config, setup.device, command)
    done = finished_cells(json_path, report)
    if done:
        log(f"resuming: {len(done)} finished cells in {json_path}")
    if not report.get("dense"):
        report["dense"] = _evaluate(setup.model, setup, config)
    log(f"dense: {report['dense']}")
    grid = [(s, r) for s in specs for r in ratios]
    keys = [cell_key(as_cell(s, r)) for s, r in grid]
    todo = [(s, _cell_options(s, r, config, setup)) for (s, r), k in zip(grid, keys, strict=True) if k not in done]
    needs = _needs([o for s, o in todo if not s.sequential], config.plots and plot_dir is not None, log)
    passes = report["calibration"].setdefault("passes", {})
    stats = _shared_statistics(setup, config, needs, passes)
    report["calibration"]["seconds"] = sum(passes.values())
    for spec, options in todo:
        cell = _run_cell(spec, options, setup, config, stats, passes)
        if all(d in cell and d in report["dense"] for d in DOMAINS):
            cell["generality"] = generality({d: cell[d] for d in DOMAINS}, report["dense"])
        done[cell_key(cell)] = cell
        log({k: v for k, v in cell.items() if k not in ("ranks", "training", "allocation_report")})
        _write(json_path, report, done, keys)
    _write(json_path, report, done, keys)
    if md_path is not None:
        Path(md_path).write_text(markdown(report))
    if config.plots and plot_dir is not None:
        write_plots(report, Path(plot_dir), setup.model, stats)
    return report


def _needs(shared: list[CompressionOptions], plots: bool, log) -> set[str]:
    """The statistics the shared pass collects: what the non-sequential cells read (plus Gram matrices for
    the spectra plot when a pass runs anyway)."""
    needs: set[str] = set()
    for options in shared:
        r = options.resolved
        needs |= statistics_needed(r.method, r.allocator, options.update, sequential=False)
    if plots:
        if needs:  # the spectra before/after whitening ride on a pass that runs anyway
            needs.add("gram")
        else:
            log("no cell left needs calibration statistics: the spectra plot is skipped (no pass just for it)")
    return needs
