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
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..allocators import allocator_names
from ..calibration.collect import collect_statistics
from ..calibration.gradients import GRADIENT_STATISTICS
from ..calibration.statistics import LinearStats
from ..core.architecture import find_architecture
from ..core.device import resolve_device
from ..core.lowrank import count_parameters
from ..core.options import parse_assignment
from ..core.ranks import check_ratio
from ..errors import SvdkitError
from ..heal import parse_heal
from ..measure.generation import generation_quality
from ..measure.scorecard import DOMAINS, ScorecardSettings, domain_perplexities, generality, zero_shot_scores
from ..measure.speed import measure, peak_rss_mb, reset_peak_rss
from ..methods import get_method, method_names
from ..pipeline.compress import run_plan
from ..pipeline.options import CalibrationSettings, CompressionOptions
from ..pipeline.plan import make_plan, statistics_needed
from ..sources.mixture import mixture_windows, parse_calib
from ..sources.models import load_model
from ..sources.text import load_text, tokenize
from ..version import __version__
from .plots import write_plots
from .report import markdown

__all__ = [
    "CellSpec",
    "BenchConfig",
    "PROTOCOL_CALIBRATION",
    "PROTOCOL_RANGES",
    "parse_spec",
    "parse_options",
    "protocol_spec",
    "run_bench",
]

VALIDATION = (40960, 57344)
"""the protocol's validation slice of WikiText-2 test tokens (8 windows of 2048 between evaluation and calibration)"""

PROTOCOL_CALIBRATION = CalibrationSettings(source="wikitext2", samples=32, seqlen=2048, offset=150000, seed=0)
"""the protocol's calibration: 32 windows of 2048 WikiText-2 test tokens at seeded offsets from 150000"""

PROTOCOL_RANGES = {"ptb": "[32768:]", "demo": "[:-32768]"}
"""the token range a named calibration part without a slice is drawn from in the bench, clear of the test and
validation windows: PTB validation after its first 16 windows of 2048 (8 test, 8 validation), Python's
docs before their last 16 (8 test, 8 validation); WikiText-2 from the calibration offset (150000), any
other text whole"""


def protocol_spec(spec: str, offset: int) -> str:
    """`spec` with the protocol's range on every part without a slice (``self`` aside): ``wikitext2`` from
    `offset`, ptb and demo as :data:`PROTOCOL_RANGES`, other texts whole."""
    out = []
    for part in parse_calib(spec):
        text = str(part)
        if not part.sliced and part.source != "self":
            cut = f"[{offset}:]" if part.source == "wikitext2" else PROTOCOL_RANGES.get(part.source, "[0:]")
            text = part.source + cut + ("" if part.windows is None else f":{part.windows}")
        out.append(text)
    return ",".join(out)


@dataclass(frozen=True)
class CellSpec:
    """One row of the grid (without its ratio)."""

    method: str
    allocation: str = "uniform"
    update: str = "none"
    sequential: bool = False
    options: str = "{}"  # allocation options as sorted JSON (hashable)
    heal: str = "none"
    heal_options: str = "{}"  # NAME.KEY -> value, sorted JSON


@dataclass
class BenchConfig:
    model: str = "smollm2-135m"
    cells: Sequence[str] = ("svd", "svd-llm")
    ratios: Sequence[float] = (0.2, 0.4, 0.6)
    data_dir: str | None = None
    calibration: CalibrationSettings = dataclasses.field(
        default_factory=lambda: dataclasses.replace(PROTOCOL_CALIBRATION)
    )
    """its seqlen is also the evaluation window; its source a calibration spec (the protocol's: wikitext2),
    whose parts without a slice are drawn from the protocol's ranges (:func:`protocol_spec`)"""
    heal_calib: str | None = None
    """the healing cells' text, a spec like the calibration's (None: they heal on the calibration windows)"""
    eval_windows: int = 16
    ptb_windows: int = 8
    pydoc_windows: int = 8
    """the third domain: the last windows of Python's documentation text"""
    zero_shot: int | None = None
    """the scorecard's zero-shot tasks on their first N documents each, for dense and every cell (None: none)"""
    generation: bool = True
    """greedy continuations of 16 prompts from the validation slice: repeated 3-grams, distinct-2"""
    perplexity: bool = True
    """False measures no perplexity (e.g. generation scores for cells whose perplexity another run holds)"""
    sensitivity_windows: int | None = None
    sensitivity_seqlen: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    """the dtype the model is loaded and compressed in (the protocol's is float32)"""
    speed: bool = True
    decode_tokens: int = 64
    repeats: int = 3
    plots: bool = True
    rank_multiple: int = 8

    @property
    def seqlen(self) -> int:
        return self.calibration.seqlen


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


def parse_options(text: str) -> dict:
    """'rule=power,strength=0.5' -> {'rule': 'power', 'strength': 0.5} (values read as JSON when they parse)."""
    options = {}
    for part in filter(None, text.split(",")):
        try:
            key, value = parse_assignment(part)
        except ValueError:
            raise SvdkitError(f"cell options are KEY=VALUE separated by commas, got {part!r}") from None
        options[key] = value
    return options


def parse_spec(spec: str) -> CellSpec:
    """'svd-llm@v2:strength=0.5+lstsq+seq+heal:block,kd:kd.lr=1e-4' -> CellSpec, checking the method,
    allocation and healing names and the healers' options."""
    head, *flags = spec.split("+")
    heals = [f.partition(":")[2] for f in flags if f.startswith("heal:")]
    flags = [f for f in flags if not f.startswith("heal:")]
    unknown = set(flags) - {"lstsq", "seq"}
    if unknown or len(heals) > 1:
        raise SvdkitError(
            f"unknown flag(s) {sorted(unknown)} in cell '{spec}': use +lstsq, +seq and one +heal:NAME[,NAME]"
        )
    heal, _, heal_opts = (heals[0] if heals else "none").partition(":")
    heal_options = parse_options(heal_opts)
    parse_heal(heal, heal_options)
    head, _, opts = head.partition(":")
    method, _, allocation = head.partition("@")
    allocation = allocation or "uniform"
    if method not in method_names():
        raise SvdkitError(f"unknown method '{method}' in cell '{spec}'; known: {', '.join(method_names())}")
    if allocation not in allocator_names():
        raise SvdkitError(f"unknown allocation '{allocation}' in cell '{spec}'; known: {', '.join(allocator_names())}")
    return CellSpec(
        method,
        allocation,
        "lstsq" if "lstsq" in flags else "none",
        "seq" in flags,
        json.dumps(parse_options(opts), sort_keys=True),
        heal,
        json.dumps(heal_options, sort_keys=True),
    )


def _key(cell: dict) -> tuple:
    return (
        cell["method"],
        cell.get("allocation", "uniform"),
        cell["ratio"],
        cell.get("update", "none"),
        bool(cell.get("sequential", False)),
        json.dumps(cell.get("allocation_options") or {}, sort_keys=True),
        cell.get("heal", "none"),
        json.dumps(cell.get("heal_options") or {}, sort_keys=True),
    )


def _as_cell(spec: CellSpec, ratio: float) -> dict:
    """The fields of a result cell that `spec` at `ratio` fixes (for :func:`_key`)."""
    options = {"allocation_options": json.loads(spec.options), "heal_options": json.loads(spec.heal_options)}
    return {**asdict(spec), "ratio": ratio, **options}


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


def _settings(config: BenchConfig) -> dict:
    c = config.calibration
    calibration = {"source": c.source, "samples": c.samples, "seqlen": c.seqlen, "offset": c.offset, "seed": c.seed}
    return {
        "model": config.model,
        "seqlen": config.seqlen,
        "eval_windows": config.eval_windows,
        "ptb_windows": config.ptb_windows,
        "rank_multiple": config.rank_multiple,
        "dtype": config.dtype,
        "perplexity": config.perplexity,
        "zero_shot_limit": config.zero_shot,
        "calibration": {**calibration, **({"heal_calib": config.heal_calib} if config.heal_calib else {})},
    }


def _resume(json_path: Path, report: dict) -> dict:
    """Finished cells of an earlier run with the same settings, by key (refuses other settings)."""
    if not json_path.exists():
        return {}
    old = json.loads(json_path.read_text())
    mine = _settings_of(report)
    theirs = _settings_of(old)
    if mine != theirs:
        raise SvdkitError(
            f"{json_path} holds results of other settings ({theirs} vs {mine}): choose another output or remove it"
        )
    report["dense"] = old.get("dense")
    report["calibration"]["passes"] = old.get("calibration", {}).get("passes", {})
    return {_key(c): c for c in old.get("cells", [])}


def _settings_of(report: dict) -> dict:
    calib = {k: v for k, v in report.get("calibration", {}).items() if k not in ("seconds", "passes")}
    calib.setdefault("source", "wikitext2")  # a file written before --calib existed used the protocol's text
    plain = {k: report.get(k) for k in ("model", "seqlen", "eval_windows", "ptb_windows")}
    kept = {
        "rank_multiple": report.get("rank_multiple", 1),
        "dtype": report.get("dtype", "float32"),
        "perplexity": report.get("perplexity", True),
        "zero_shot_limit": report.get("zero_shot_limit"),
    }
    return {**plain, **kept, "calibration": calib}


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
        **_settings(config),
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
    options = json.loads(spec.options)
    if spec.allocation == "sensitivity":
        sens = {"windows": config.sensitivity_windows, "seqlen": config.sensitivity_seqlen}
        options = {**{k: v for k, v in sens.items() if v is not None}, **options}
    loud = spec.allocation != "uniform" or spec.sequential or get_method(spec.method).stage is not None
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
        **({"training": r.training} if r.training else {}),
        **({"healing": r.healing} if r.healing else {}),
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
    done = _resume(json_path, report)
    if done:
        log(f"resuming: {len(done)} finished cells in {json_path}")
    if not report.get("dense"):
        report["dense"] = _evaluate(setup.model, setup, config)
    log(f"dense: {report['dense']}")
    grid = [(s, r) for s in specs for r in ratios]
    keys = [_key(_as_cell(s, r)) for s, r in grid]
    todo = [(s, _cell_options(s, r, config, setup)) for (s, r), k in zip(grid, keys, strict=True) if k not in done]
    needs = _needs([o for s, o in todo if not s.sequential], config.plots and plot_dir is not None, log)
    passes = report["calibration"].setdefault("passes", {})
    stats = _shared_statistics(setup, config, needs, passes)
    report["calibration"]["seconds"] = sum(passes.values())
    for spec, options in todo:
        cell = _run_cell(spec, options, setup, config, stats, passes)
        if all(d in cell and d in report["dense"] for d in DOMAINS):
            cell["generality"] = generality({d: cell[d] for d in DOMAINS}, report["dense"])
        done[_key(cell)] = cell
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
