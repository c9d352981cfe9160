"""The factor stage (:func:`factor`): every target replaced by the method's factors, one decoder layer at a
time on the layer engine, calibrating as it goes where the plan calibrates layer by layer, and healing each
layer right after where the plan has healers that work per layer."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibration.collect import LayerStats, calibrate_layers
from ..calibration.statistics import LinearStats
from ..core import distributed
from ..core.lowrank import LowRankLinear
from ..core.modeling_svdkit import QuantLowRankLinear
from ..core.report import Report
from ..engine import LayerSource, Step, captured, walk_layers
from ..errors import SvdkitError
from ..heal import DenseReference, HealContext, LayerHealing
from ..methods import factorize
from ..methods.base import Compact, Quantized
from ..methods.blockquant import dequantize, pack
from .plan import CompressionPlan
from .update import UPDATES

__all__ = ["Factored", "factor_linear", "factor"]

Statistics = Mapping[str, LinearStats]


def factor_linear(
    linear: nn.Linear,
    method,
    config,
    stats,
    rank: int,
    device: torch.device,
    name: str,
    update: str = "none",
    owner: int | None = None,
) -> LowRankLinear:
    """Factor one nn.Linear with `method` in float64 on `device`; returns a LowRankLinear where the linear was.

    `update` (a name in :data:`~svdkit.pipeline.update.UPDATES`, e.g. ``"lstsq"``) refits B on the calibration
    statistics afterwards.
    In a distributed run, process `owner` computes the factors and broadcasts them to the others.
    """
    if owner is None or distributed.size() == 1:
        A, B, quantized = _factors(linear, method, config, stats, rank, device, name, update)
    else:
        mine = distributed.rank() == owner
        made = _factors(linear, method, config, stats, rank, device, name, update) if mine else None
        A, B, quantized = _shared(made, linear, device, owner)
    home, dtype = linear.weight.device, linear.weight.dtype
    bias = linear.bias.detach() if linear.bias is not None else None
    if quantized is not None:
        return quantized_layer(A.to(home, dtype), B.to(home, dtype), quantized, bias)
    return LowRankLinear.from_factors(A.to(home, dtype), B.to(home, dtype), bias)


def quantized_layer(A: torch.Tensor, B: torch.Tensor, quantized: Quantized, bias) -> QuantLowRankLinear:
    """The QuantLowRankLinear of factors over a quantized part, its codes packed as runtimes read them."""
    layer = QuantLowRankLinear(A.shape[1], B.shape[0], A.shape[0], quantized.bits, quantized.block, bias is not None)
    layer = layer.to(A.device, A.dtype)
    with torch.no_grad():
        layer.A.copy_(A)
        layer.B.copy_(B)
        layer.qweight.copy_(pack(quantized.codes, quantized.bits, quantized.block))
        layer.scales.copy_(quantized.scales)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _shared(made: Compact | None, linear: nn.Linear, device: torch.device, owner: int) -> Compact:
    """The owner's float64 factors (and quantized part) on every process: their rank and the quantized part's bits
    and block first, since a method may return fewer and the others do not know whether it makes one."""
    A, B, quantized = made if made is not None else (None, None, None)
    head = [0, 0, 0]
    if made is not None:
        head = [A.shape[0], quantized.bits, quantized.block] if quantized else [A.shape[0], 0, 0]
    k, bits, block = (int(v) for v in distributed.broadcast_(torch.tensor(head, device=device), owner))
    m, n = linear.out_features, linear.in_features
    if made is None:
        A = torch.empty(k, n, dtype=torch.float64, device=device)
        B = torch.empty(m, k, dtype=torch.float64, device=device)
        if bits:
            codes = torch.empty(m, n, dtype=torch.int8, device=device)
            scales = torch.empty(m, -(-n // block), dtype=torch.float64, device=device)
            quantized = Quantized(codes, scales, bits, block)
    A, B = distributed.broadcast_(A.contiguous(), owner), distributed.broadcast_(B.contiguous(), owner)
    if bits:
        codes = distributed.broadcast_(quantized.codes.to(device).contiguous(), owner)
        scales = distributed.broadcast_(quantized.scales.to(device).contiguous(), owner)
        quantized = Quantized(codes, scales, bits, block)
    return Compact(A, B, quantized)


def _factors(linear, method, config, stats, rank, device, name, update) -> Compact:
    W = linear.weight.detach().to(device=device, dtype=torch.float64)
    A, B, quantized = factorize(method, config, W, stats, rank, device, name)
    refit = UPDATES[update]
    if refit is not None:  # B A fits what the quantized part leaves
        target = W if quantized is None else W - dequantize(quantized.codes, quantized.scales.to(W), quantized.block)
        B = refit.refit(target, A, B, stats)
        if not torch.isfinite(B).all():
            raise SvdkitError(f"the {refit.name} update produced non-finite factors for {name}")
    return Compact(A, B, quantized)


@dataclass
class Factored:
    """What :func:`factor` did."""

    seconds: dict[str, float]
    """seconds spent in ``calibration`` (while streaming), ``decomposition`` and ``healing`` (the healers that
    ran layer by layer in the factor stage's walk)"""
    healing: dict[str, Report] = field(default_factory=dict)
    """the reports of those healers, by name"""


def factor(
    plan: CompressionPlan,
    model: nn.Module,
    ranks: Mapping[str, int | None],
    statistics: Statistics | None,
    windows: torch.Tensor | None,
    source: LayerSource | None = None,
    keep: DenseReference | None = None,
) -> Factored:
    """Replace every target of rank not None by the method's factors, one decoder layer at a time on the layer
    engine, and heal each layer right after where the plan has healers that work per layer
    (:attr:`~.plan.CompressionPlan.layer_healers`). `source` loads each decoder layer before it is factored and
    takes it once final (a streamed compression; default: the layers stay in memory). `keep` receives every
    replaced dense module (the healers' reference); one whose layers are all healed here forgets them after
    each layer."""
    arch = plan.architecture(model)
    spent = {"calibration": 0.0, "decomposition": 0.0, "healing": 0.0}
    replace = _replacer(plan, arch, ranks, keep, spent)

    def use(item: LayerStats) -> None:
        replace(item.layer, item.index, item.stats, list(item.stats))  # sequential: one stage's targets

    def given(step: Step) -> None:
        stats = {t: statistics.get(step.name + t) for t in arch.targets} if plan.needs else None
        replace(step.layer, step.index, stats, arch.targets)

    t, progress = time.perf_counter(), plan.options.progress
    windows = distributed.shard(windows) if windows is not None else None  # this process's share
    healers = _layer_healing(plan, model, keep, windows)
    then = list(healers.values())
    if then and keep is not None and len(healers) == len(plan.options.resolved.heal):
        then.append(lambda step: keep.forget(step.name))  # no healer after these needs the dense layers
    try:
        if plan.layerwise:
            sequential = plan.options.sequential
            records = calibrate_layers(
                model, arch, windows, plan.needs, plan.device, use, sequential, progress, source, then=then
            )
        elif then:
            with captured(model, arch, windows, plan.device, progress) as inputs:
                walked = walk_layers(
                    arch,
                    plan.device,
                    [given, *then],
                    inputs,
                    keep_dense=True,
                    source=source,
                    progress=progress,
                    desc="factoring and healing",
                )
                records = walked.records
        else:
            records = walk_layers(
                arch, plan.device, [given], source=source, progress=progress, desc="decomposing"
            ).records
    finally:
        for work in healers.values():
            work.close()
    reports = {name: work.report(records) for name, work in healers.items()}
    spent["healing"] = sum(r.seconds for r in reports.values())
    if plan.layerwise:
        spent["calibration"] = time.perf_counter() - t - spent["decomposition"] - spent["healing"]
    return Factored(spent, reports)


def _replacer(plan: CompressionPlan, arch, ranks: Mapping[str, int | None], keep: DenseReference | None, spent):
    """replace(layer, index, stats, names): the named targets of one layer replaced by the method's factors."""

    def replace(layer: nn.Module, index: int, stats: Mapping | None, names) -> None:
        t = time.perf_counter()
        todo = [target for target in names if ranks[f"{arch.layers_path}.{index}.{target}"] is not None]
        owners = distributed.assign([_svd_cost(layer.get_submodule(t)) for t in todo])  # processes share a layer
        for target, owner in zip(todo, owners, strict=True):
            full = f"{arch.layers_path}.{index}.{target}"
            linear = layer.get_submodule(target)
            low = factor_linear(
                linear,
                plan.method,
                plan.method_config,
                stats.pop(target) if stats else None,  # dropped once used: a layer's Grams go as it is factored
                ranks[full],
                plan.device,
                full,
                plan.options.update,
                owner=owner,
            )
            if keep is not None:
                keep.keep(full, linear)
            layer.set_submodule(target, low)
        spent["decomposition"] += time.perf_counter() - t

    return replace


def _layer_healing(
    plan: CompressionPlan, model: nn.Module, keep: DenseReference | None, windows: torch.Tensor | None
) -> dict[str, LayerHealing]:
    """The per-layer work of the healers that run in the factor stage's walk, by name."""
    if not plan.layer_healers:
        return {}
    if keep is None:  # as the heal stage requires: a layer healer may need the dense layer back
        raise SvdkitError("healing needs the dense modules the factor stage replaced: pass keep=DenseReference()")
    context = HealContext(model, plan.architecture(model), keep, windows, plan.device, plan.options.progress)
    return {healer.name: healer.layer(context, config) for healer, config in plan.layer_healers}


def _svd_cost(linear: nn.Module) -> float:
    """How long a matrix's decomposition takes, roughly: an SVD of m x n costs m n min(m, n)."""
    m, n = linear.out_features, linear.in_features
    return float(m * n * min(m, n))
