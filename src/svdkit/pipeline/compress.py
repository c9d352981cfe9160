"""The compression pipeline: allocate ranks, calibrate layer by layer, decompose, swap. Method-agnostic."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..allocators import AllocationContext, get_allocator, make_allocation_config
from ..calibration.collect import CROSS, collect_statistics, iterate_layers
from ..calibration.gradients import GRADIENT_STATISTICS
from ..calibration.statistics import LinearStats
from ..calibration.store import StatisticsStore
from ..core.architecture import find_architecture
from ..core.device import resolve_device
from ..core.lowrank import LowRankLinear, count_parameters
from ..core.ranks import align_ranks, check_rank_multiple, check_ratio
from ..errors import SvdkitError
from ..methods import factorize, get_method, make_config
from ..saved.format import SvdkitConfig
from ..saved.kvcache import KV_TARGETS, check_kv_ratio, kv_ranks
from ..sources.text import calibration_windows, source_tokens
from ..version import __version__
from .update import UPDATES, lstsq_update

__all__ = ["CompressionResult", "compress", "decompose_linear"]


@dataclass
class CompressionResult:
    method: str
    ratio: float
    params_dense: int
    params: int
    ranks: dict[str, int]
    dense_kept: list[str]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    """seconds spent in calibration, decomposition and allocation"""
    allocation: dict[str, Any] = field(default_factory=dict)
    """the allocation strategy, its config and what it reported (e.g. a chosen threshold)"""
    training: dict[str, Any] = field(default_factory=dict)
    """a method's whole-model stage report (SoCo: budget, kept count, time, loss curve per step)"""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decompose_linear(
    linear: nn.Linear, method, config, stats, rank: int, device: torch.device, name: str, update: str = "none"
):
    """Factor one nn.Linear with `method` in float64 on `device`; returns a LowRankLinear where the linear was.

    ``update="lstsq"`` refits B on the calibration inputs afterwards (:func:`~svdkit.update.lstsq_update`).
    """
    W = linear.weight.detach().to(device=device, dtype=torch.float64)
    A, B = factorize(method, config, W, stats, rank, device, name)
    if update == "lstsq":
        gram = stats.gram_mean.to(W)
        cross = stats["cross"].to(W) / max(stats.tokens, 1) if "cross" in stats else None
        B = lstsq_update(W, A, B, gram, cross)
        if not torch.isfinite(B).all():
            raise SvdkitError(f"the least-squares update produced non-finite factors for {name}")
    home, dtype = linear.weight.device, linear.weight.dtype
    bias = linear.bias.detach() if linear.bias is not None else None
    return LowRankLinear.from_factors(A.to(home, dtype), B.to(home, dtype), bias)


def compress(
    model: nn.Module,
    tokenizer=None,
    method: str = "svd-llm",
    ratio: float = 0.2,
    calib: str | os.PathLike | torch.Tensor = "demo",
    calib_samples: int = 32,
    calib_seqlen: int = 2048,
    calib_offset: int = 0,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    method_options: Mapping[str, Any] | None = None,
    targets: Sequence[str] | None = None,
    sequential: bool = False,
    statistics: Mapping[str, LinearStats] | None = None,
    progress: bool = True,
    allocation: str = "uniform",
    allocation_options: Mapping[str, Any] | None = None,
    update: str = "none",
    statistics_dir: str | os.PathLike | None = None,
    kv_ratio: float | None = None,
    rank_multiple: int = 8,
) -> CompressionResult:
    """Compress `model` in place: every target linear becomes a LowRankLinear of its allocated rank.

    `calib` is a text source (see :mod:`svdkit.data`) or a 1-D tensor of token ids; it is read when
    the method needs calibration statistics or the allocation needs windows. The model's config
    records the method, ratio, allocation and ranks, so :func:`svdkit.save` writes a folder that loads
    back as the same low-rank model. `statistics` (from :func:`svdkit.calibration.collect_statistics`,
    by full module name) skips the calibration pass, so one pass can serve several methods and ratios.

    With uniform allocation and input statistics only, calibration streams: each layer is factored as
    soon as its statistics are ready, and only one layer's statistics are ever held. With
    ``sequential=True`` it always streams; an allocation that needs every matrix's statistics then
    gets them from a dense pass first (ranks from the dense model, factors from the compressed one). Other allocations
    (``v2``, ``sensitivity``) and gradient statistics (FWSVD's Fisher information) need every matrix's
    statistics before any rank is fixed: those are written layer by layer to a temporary folder in
    `statistics_dir` (default: the system's temporary folder; for SmolLM2-135M 0.8 GB, see
    :mod:`svdkit.store`) and read back one layer at a time. ``update="lstsq"`` refits each B on the
    calibration inputs after the method (:mod:`svdkit.update`); with ``sequential=True`` it fits the
    dense layer's outputs from the compressed model's inputs, which also runs a dense stream. A method
    with a whole-model stage (``soco``) factors every target at the stage's start ranks; the stage
    then trains on the calibration windows and fixes the final ranks within the parameter budget the
    allocation gives at `ratio` (see :mod:`svdkit.spectrum`). Input is
    checked before any module is touched; a failure during decomposition leaves the model partly
    compressed (reload it).

    `kv_ratio` fixes every k_proj / v_proj at the rank that shrinks a latent KV cache by that fraction
    (:func:`~svdkit.kvcache.kv_ranks`), whatever the allocation gave them, and keeps them low-rank even
    above their parameter break-even; the other targets keep the uniform allocation's ranks (another
    allocation is refused: it spreads one budget over all matrices). With ``ratio=0`` only k_proj /
    v_proj are compressed. Load the result with ``kv_cache="latent"`` to cache the latents.

    `rank_multiple` rounds the allocated ranks to multiples of it within the same parameter budget
    (:func:`~svdkit.allocation.align_ranks`; SoCo rounds its final ranks), since two products of
    aligned widths run faster; 1 keeps the allocation's exact ranks (the papers' convention). The
    k/v ranks that `kv_ratio` fixes stay exact.
    """
    start = time.perf_counter()
    spec = get_method(method)
    config = make_config(spec, method_options)
    allocator = get_allocator(allocation)
    alloc_config = make_allocation_config(allocator, allocation_options)
    rank_multiple = check_rank_multiple(rank_multiple)
    if kv_ratio is not None:
        kv_ratio = check_kv_ratio(kv_ratio)
        if spec.stage is not None:
            raise SvdkitError(f"kv_ratio fixes the k/v ranks, but method '{method}' chooses every rank itself")
    kv_only = kv_ratio is not None and ratio == 0
    if kv_ratio is not None and allocation != "uniform":
        raise SvdkitError(
            f"kv_ratio fixes the k/v ranks after allocation, which would break allocation '{allocation}''s "
            "budget over all matrices: use the uniform allocation with kv_ratio"
        )
    if kv_only and targets is not None:
        raise SvdkitError("ratio 0 with kv_ratio compresses exactly k_proj/v_proj: do not pass targets")
    if not kv_only:
        ratio = check_ratio(ratio)
    if update not in UPDATES:
        raise SvdkitError(f"unknown update '{update}'; known: {', '.join(UPDATES)}")
    dev = resolve_device(device)
    if any(isinstance(m, LowRankLinear) for m in model.modules()):
        raise SvdkitError("this model is already compressed by svdkit: start from the dense model")
    arch = find_architecture(model, KV_TARGETS if kv_only else targets)
    shapes = arch.shapes()
    if kv_ratio is not None and not kv_ranks(shapes, kv_ratio):
        raise SvdkitError(f"kv_ratio needs k_proj/v_proj among the targets, but the targets are {arch.targets}")
    params_dense = count_parameters(model)
    timings = {"allocation": 0.0, "calibration": 0.0, "decomposition": 0.0}
    if spec.stage is not None:
        timings["training"] = 0.0

    needs = set(spec.requires | allocator.requires | ({"gram"} if update == "lstsq" else set()))
    if update == "lstsq" and sequential:
        needs.add(CROSS)  # fit B to the dense layer's outputs from the compressed model's inputs
    if needs and statistics is not None:
        missing = [n for n in shapes if n not in statistics]
        if missing:
            raise SvdkitError(f"the given statistics lack {len(missing)} target(s), e.g. {missing[0]}")
        lacking = sorted(needs - set(statistics[next(iter(shapes))].values))
        if lacking:
            raise SvdkitError(
                f"method '{method}' with allocation '{allocation}' and update '{update}' needs statistics "
                f"{lacking}, which the given ones lack"
            )
    # A dense pass first when ranks need every matrix's statistics (or gradients); then either the
    # decomposition reads them back, or (sequential) a streaming pass computes each layer's own.
    collect_first = (
        bool(needs) and statistics is None and (allocator.needs_statistics or bool(needs & GRADIENT_STATISTICS))
    )
    streaming = bool(needs) and statistics is None and (sequential or not collect_first)
    if sequential and (not streaming or needs & GRADIENT_STATISTICS):
        raise SvdkitError(
            "sequential mode computes each layer's statistics after the layers before it are compressed: it "
            "needs input statistics (a method that uses them, or an update), no gradient statistics and no "
            f"precomputed statistics (here: method '{method}', allocation '{allocation}', update '{update}')"
        )
    windows = None
    if streaming or collect_first or allocator.needs_windows or spec.stage is not None:
        if tokenizer is None and not isinstance(calib, torch.Tensor):
            raise SvdkitError(
                f"method '{method}' with allocation '{allocation}' needs calibration text: "
                "pass a tokenizer or token ids"
            )
        windows = calibration_windows(source_tokens(tokenizer, calib), calib_samples, calib_seqlen, calib_offset, seed)
    if windows is not None:
        calibration = {
            "source": "token ids" if isinstance(calib, torch.Tensor) else os.fspath(calib),
            "samples": calib_samples,
            "seqlen": calib_seqlen,
            "offset": calib_offset,
            "seed": seed,
            "sequential": sequential,
        }
    else:
        calibration = None
    if needs and statistics is not None:
        calibration = {
            "statistics": "precomputed",
            "tokens": next(iter(statistics.values())).tokens,
            **(calibration or {}),
        }

    def replace(layer: nn.Module, index: int, stats: Mapping | None) -> None:
        t = time.perf_counter()
        for target in list(stats) if stats is not None else arch.targets:  # sequential: one stage's targets
            full = f"{arch.layers_path}.{index}.{target}"
            if ranks[full] is None:
                continue
            low = decompose_linear(
                layer.get_submodule(target),
                spec,
                config,
                stats[target] if stats else None,
                ranks[full],
                dev,
                full,
                update,
            )
            layer.set_submodule(target, low)
        timings["decomposition"] += time.perf_counter() - t

    was_training = model.training
    model.eval()
    store = None
    try:
        if collect_first:
            t = time.perf_counter()
            store = StatisticsStore(statistics_dir)
            statistics = collect_statistics(model, arch, windows, needs - {CROSS}, dev, progress, store=store)
            timings["calibration"] = time.perf_counter() - t
        t = time.perf_counter()
        context = AllocationContext(
            shapes=shapes,
            ratio=ratio,
            model=model,
            arch=arch,
            method=spec,
            method_config=config,
            statistics=statistics if needs else None,
            windows=windows,
            calibration=calibration,
            device=dev,
            progress=progress,
            rank_multiple=rank_multiple,
        )
        ranks = {n: None for n in shapes} if kv_only else allocator.allocate(context, alloc_config)
        if set(ranks) != set(shapes):
            raise RuntimeError(f"allocator {allocation} returned ranks for other modules than the targets")
        fixed = kv_ranks(shapes, kv_ratio) if kv_ratio is not None else {}  # exact: they size the cache
        if spec.stage is None:
            rest = {n: k for n, k in ranks.items() if n not in fixed}
            ranks = {**ranks, **align_ranks(rest, shapes, rank_multiple)}
        ranks.update(fixed)
        timings["allocation"] = time.perf_counter() - t
        budget = ranks
        if spec.stage is not None:  # factor at the stage's start ranks; the stage fixes the final ones
            ranks = spec.stage.start_ranks(shapes, config)
        if streaming:
            if store is not None:  # the dense pass served the allocation only
                store.close()
            t_loop = time.perf_counter()
            for item in iterate_layers(model, arch, windows, needs, dev, sequential, progress):
                replace(item.layer, item.index, item.stats)
            timings["calibration"] += time.perf_counter() - t_loop - timings["decomposition"]
        else:
            bar = tqdm(arch.layers, desc="decomposing", unit="layer", disable=not progress)
            for index, layer in enumerate(bar):
                prefix = f"{arch.layers_path}.{index}."
                stats = {t: statistics.get(prefix + t) for t in arch.targets} if needs else None
                replace(layer, index, stats)
        training: dict[str, Any] = {}
        if spec.stage is not None:
            if store is not None:
                store.close()
            t = time.perf_counter()
            ranks, training = spec.stage.run(model, context, budget, config)
            timings["training"] = time.perf_counter() - t
    finally:
        model.train(was_training)
        if store is not None:
            store.close()

    kept = {name: int(r) for name, r in ranks.items() if r is not None}
    alloc_record = {
        "name": allocation,
        "config": _plain(alloc_config),
        "rank_multiple": rank_multiple,
        **context.report,
    }
    model.config.quantization_config = SvdkitConfig(
        method=method,
        ratio=ratio,
        ranks=kept,
        version=__version__,
        method_config=_plain(config),
        params_dense=params_dense,
        calibration=calibration,
        allocation=alloc_record,
        update=update,
        kv_ratio=kv_ratio,
        **({"training": {k: v for k, v in training.items() if k != "curve"}} if training else {}),
    )
    return CompressionResult(
        method=method,
        ratio=ratio,
        params_dense=params_dense,
        params=count_parameters(model),
        ranks=kept,
        dense_kept=[n for n, r in ranks.items() if r is None],
        seconds=time.perf_counter() - start,
        timings=timings,
        allocation=alloc_record,
        training=training,
    )


def _plain(config) -> dict[str, Any]:
    return asdict(config) if hasattr(config, "__dataclass_fields__") else {}
