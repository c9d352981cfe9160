"""The named stages of a compression, each callable on its own with a :class:`~.plan.CompressionPlan`.

1. :func:`read_windows`: the calibration windows, when anything needs them;
2. :func:`calibrate`: the statistics that must exist before any rank is fixed (precomputed ones, or a
   dense pass spilled to disk); streaming modes calibrate inside :func:`factor` instead;
3. :func:`summarize`: what an allocator that summarizes keeps of every matrix (from those statistics,
   or from a calibration pass of its own that keeps nothing else);
4. :func:`allocate`: the allocator's ranks, aligned to the rank multiple, with the fixed k/v ranks;
5. :func:`factor` (:mod:`.factor`): every target replaced by the method's factors (calibrating layer by layer
   while streaming; each layer healed right after by the healers that work per layer);
6. :func:`train`: the method's whole-model training (SoCo's) (fixes the final ranks);
7. :func:`heal`: the other healers (:mod:`svdkit.heal`) train the factors toward the dense model, ranks kept;
8. :func:`record`: the saved record on the model's config, and the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..allocators import AllocationContext
from ..calibration.collect import CROSS, LayerStats, calibrate_layers, collect_statistics
from ..calibration.statistics import LinearStats
from ..calibration.store import StatisticsStore
from ..core import distributed
from ..core.lowrank import count_parameters
from ..core.modeling_svdkit import QuantLowRankLinear
from ..core.ranks import align_ranks
from ..core.report import Report
from ..engine import LayerSource, Step, walk_layers
from ..errors import SvdkitError
from ..heal import DenseReference, HealContext
from ..saved.format import make_portable
from ..sources.mixture import mixture_windows
from ..version import __version__
from .factor import Factored, factor, factor_linear
from .plan import CompressionPlan

__all__ = [
    "Allocation",
    "CompressionResult",
    "Factored",
    "allocate",
    "calibrate",
    "factor_linear",
    "factor",
    "heal",
    "train",
    "read_windows",
    "record",
    "summarize",
]

Statistics = Mapping[str, LinearStats]


@dataclass
class CompressionResult:
    method: str
    ratio: float | None
    """the parameter ratio asked for (None: the method set its ranks itself)"""
    params_dense: int
    params: int
    ranks: dict[str, int]
    dense_kept: list[str]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    """seconds spent in calibration, decomposition and allocation"""
    allocation: dict[str, Any] = field(default_factory=dict)
    """the allocation strategy, its config and what it reported (e.g. a chosen threshold)"""
    training: Report | None = None
    """the report of a method's whole-model training (SoCo: budget, kept count, time, loss curve per step)"""
    healing: dict[str, Report] = field(default_factory=dict)
    """each healer's report, by name (held-out loss before and after, steps, time)"""
    quantized: dict[str, int] | None = None
    """the quantized base's bits and block size, for a method that makes one (qlr)"""

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the reports as :meth:`~svdkit.core.report.Report.as_dict` gives them)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["training"] = self.training.as_dict() if self.training else None
        out["healing"] = {name: report.as_dict() for name, report in self.healing.items()}
        return out


@dataclass
class Allocation:
    """What :func:`allocate` decides."""

    ranks: dict[str, int | None]
    """the ranks :func:`factor` uses (a method with a whole-model training: its start ranks)"""
    budget: dict[str, int | None]
    """the allocation's ranks at the target ratio (aligned, k/v fixed): the parameter budget"""
    context: AllocationContext


def read_windows(
    plan: CompressionPlan,
    tokenizer: Any = None,
    model: nn.Module | None = None,
    texts: Mapping[str, torch.Tensor] | None = None,
    healing: bool = False,
) -> torch.Tensor | None:
    """The calibration windows (n x seqlen token ids) when the plan needs them, else None; with `healing`, the
    windows of the healing text (``heal_calib``) when the plan has one, else None. The one place settings
    become windows (:func:`~svdkit.sources.mixture.mixture_windows`): `model`, still dense, writes the
    ``self`` text; `texts` gives named sources' token streams (the benchmark's), instead of reading them."""
    options = plan.options
    if healing:
        c = options.resolved.heal_calibration if plan.heals else None
    else:
        c = options.calibration if plan.needs_windows else None
    if c is None:
        return None
    return mixture_windows(c.source, c.samples, c.seqlen, c.offset, c.seed, tokenizer, model, texts, options.progress)


def calibrate(plan: CompressionPlan, model: nn.Module, windows: torch.Tensor | None) -> Statistics | None:
    """The statistics needed before allocation: the precomputed ones, or a dense pass into a
    :class:`~svdkit.calibration.store.StatisticsStore` (the caller closes it); None when streaming covers it."""
    if plan.statistics is not None:
        return plan.statistics
    if not plan.dense_pass:
        return None
    store = StatisticsStore(plan.options.statistics_dir)
    try:
        arch = plan.architecture(model)
        return collect_statistics(
            model, arch, windows, plan.needs - {CROSS}, plan.device, plan.options.progress, store=store
        )
    except BaseException:
        store.close()
        raise


def summarize(
    plan: CompressionPlan,
    model: nn.Module,
    statistics: Statistics | None,
    windows: torch.Tensor | None,
    source: LayerSource | None = None,
) -> dict[str, Any] | None:
    """Every target's summary by the allocator's ``summarize``, one decoder layer at a time: from
    `statistics` when the plan has them, else from a dense calibration pass that keeps nothing but the
    summaries (`source` loads and frees its layers). None when the allocator keeps no summaries."""
    summarize_layer = plan.allocator.summarize
    if summarize_layer is None or plan.options.resolved.kv_only:
        return None
    arch, config = plan.architecture(model), plan.options.resolved.allocation_config
    summaries: dict[str, Any] = {}

    def add(layer: nn.Module, index: int, stats: Mapping[str, LinearStats]) -> None:
        prefix = f"{arch.layers_path}.{index}."
        weights = {prefix + t: layer.get_submodule(t).weight for t in arch.targets if t in stats}
        given = {prefix + t: stats[t] for t in stats}
        summaries.update(summarize_layer(weights, given, config, plan.device, plan.method, plan.method_config))

    if statistics is not None:

        def given(step: Step) -> None:
            add(step.layer, step.index, {t: statistics[step.name + t] for t in arch.targets})

        walk_layers(arch, plan.device, [given], progress=False)
        return summaries
    windows = distributed.shard(windows)  # this process's share; the statistics are summed over all
    needs, progress = plan.allocator.requires, plan.options.progress

    def use(item: LayerStats) -> None:
        add(item.layer, item.index, item.stats)

    calibrate_layers(model, arch, windows, needs, plan.device, use, False, progress, source, "summarizing")
    return summaries


def allocate(
    plan: CompressionPlan,
    model: nn.Module,
    statistics: Statistics | None,
    windows: torch.Tensor | None,
    summaries: Mapping[str, Any] | None = None,
) -> Allocation:
    """Ranks by the plan's allocator (from `statistics`, or the `summaries` of :func:`summarize`), rounded
    to the rank multiple within their budget, k/v ranks fixed."""
    options = plan.options
    context = AllocationContext(
        shapes=plan.shapes,
        ratio=plan.ratio,
        model=model,
        arch=plan.architecture(model),
        method=plan.method,
        method_config=plan.method_config,
        statistics=statistics if plan.needs else None,
        summaries=summaries,
        windows=windows,
        calibration=plan.calibration_record(),
        device=plan.device,
        progress=options.progress,
        rank_multiple=options.rank_multiple,
    )
    shapes = plan.shapes
    if options.resolved.kv_only:
        ranks: dict[str, int | None] = {n: None for n in shapes}
    elif plan.allocator.corrects_base:  # a byte budget spent on a stored base's corrections: ranks final
        ranks = plan.allocator.allocate(context, options.resolved.allocation_config)
        return Allocation(ranks, ranks, context)
    elif plan.method.ranks is not None:  # the method sets its own (no allocation, no budget to round within)
        ranks = dict(plan.method.ranks(shapes, plan.method_config))
        return Allocation(ranks, ranks, context)
    else:
        ranks = plan.allocator.allocate(context, options.resolved.allocation_config)
    if set(ranks) != set(shapes):
        raise RuntimeError(f"allocator {options.allocation} returned ranks for other modules than the targets")
    if plan.method.training is None:
        rest = {n: k for n, k in ranks.items() if n not in plan.fixed_ranks}
        ranks = {**ranks, **align_ranks(rest, shapes, options.rank_multiple)}
    ranks.update(plan.fixed_ranks)  # exact: they size the cache
    start = ranks if plan.method.training is None else plan.method.training.start_ranks(shapes, plan.method_config)
    return Allocation(start, ranks, context)


def train(
    plan: CompressionPlan, model: nn.Module, allocation: Allocation
) -> tuple[dict[str, int | None], Report | None]:
    """Run the method's whole-model training, if it has one: (final ranks by name, its report)."""
    if plan.method.training is None:
        return dict(allocation.ranks), None
    return plan.method.training.run(model, allocation.context, allocation.budget, plan.method_config)


def heal(
    plan: CompressionPlan, model: nn.Module, dense: DenseReference | None, windows: torch.Tensor | None
) -> dict[str, Report]:
    """Run the healers the plan asks for after the factor stage's walk (those not among its
    :attr:`~.plan.CompressionPlan.layer_healers`), in order, on the compressed `model` (ranks kept), on `windows`
    (the healing text's when the plan has one, see :func:`read_windows`); their reports by name."""
    after = plan.options.resolved.heal[len(plan.layer_healers) :]
    if not after:
        return {}
    if dense is None or windows is None:
        raise SvdkitError("healing needs the dense modules the factor stage replaced and its windows")
    context = HealContext(model, plan.architecture(model), dense, windows, plan.device, plan.options.progress)
    return {healer.name: healer.run(context, config) for healer, config in after}


def record(
    plan: CompressionPlan,
    model: nn.Module,
    allocation: Allocation,
    ranks: Mapping[str, int | None],
    training: Report | None,
    timings: dict[str, float],
    seconds: float,
    healing: dict[str, Report] | None = None,
) -> CompressionResult:
    """Give the model its svdkit record and classes (:func:`~svdkit.saved.format.make_portable`); the result."""
    options = plan.options
    kept = {name: int(r) for name, r in ranks.items() if r is not None}
    quantized = _quantized(model, kept)
    alloc_record = {
        "name": options.allocation,
        "config": _plain(options.resolved.allocation_config),
        "rank_multiple": options.rank_multiple,
        **allocation.context.report,
    }
    make_portable(
        model,
        {
            "method": options.method,
            "ratio": None if plan.method.ranks else plan.ratio,
            "ranks": kept,
            **({"quantized": quantized} if quantized else {}),
            "version": __version__,
            "method_config": _plain(plan.method_config),
            "params_dense": plan.facts.params,
            "calibration": allocation.context.calibration,
            "allocation": alloc_record,
            "update": options.update,
            "kv_ratio": options.resolved.kv_ratio,
            **({"training": training.record()} if training else {}),
            **({"heal": _heal_record(plan, healing)} if healing else {}),
        },
    )
    return CompressionResult(
        method=options.method,
        ratio=None if plan.method.ranks else plan.ratio,
        params_dense=plan.facts.params,
        params=count_parameters(model),
        ranks=kept,
        dense_kept=[n for n, r in ranks.items() if r is None],
        seconds=seconds,
        timings=timings,
        allocation=alloc_record,
        training=training,
        healing=healing or {},
        quantized=quantized,
    )


def _quantized(model: nn.Module, ranks: Mapping[str, int]) -> dict[str, int] | None:
    """The quantized base's bits and block size, as the record keeps them (one for the whole model)."""
    layers = [model.get_submodule(name) for name in ranks]
    kinds = {(m.bits, m.block) for m in layers if isinstance(m, QuantLowRankLinear)}
    if not kinds:
        return None
    if len(kinds) > 1 or len(layers) != sum(isinstance(m, QuantLowRankLinear) for m in layers):
        raise SvdkitError(f"a model's quantized bases must all have the same bits and block size, found {kinds}")
    bits, block = kinds.pop()
    return {"bits": bits, "block": block}


def _heal_record(plan: CompressionPlan, healing: dict[str, Report]) -> list[dict[str, Any]]:
    """What the saved record keeps of each healer: its name, config and report (no curves)."""
    text = {"calibration": plan.options.resolved.heal_calibration.record()} if plan.own_heal_text else {}
    return [
        {"name": h.name, "config": _plain(config), **healing[h.name].record(), **text}
        for h, config in plan.options.resolved.heal
    ]


def _plain(config) -> dict[str, Any]:
    return asdict(config) if hasattr(config, "__dataclass_fields__") else {}
