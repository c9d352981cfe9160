"""compress(): the plan (:mod:`.plan`) and the named stages (:mod:`.stages`), run in order. Method-agnostic."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..calibration.statistics import LinearStats
from ..calibration.store import StatisticsStore
from ..core.report import Report
from ..heal import DenseReference
from .options import CalibrationSettings, CompressionOptions
from .plan import CompressionPlan, make_plan
from .stages import (
    CompressionResult,
    allocate,
    calibrate,
    factor,
    factor_linear,
    read_windows,
    record,
    summarize,
    train,
)
from .stages import heal as heal_stage

__all__ = ["CompressionResult", "compress", "factor_linear", "run_plan"]


def compress(
    model: nn.Module,
    tokenizer=None,
    method: str = "svd-llm",
    ratio: float = 0.2,
    calib: str | os.PathLike | torch.Tensor = "demo",
    calib_samples: int | None = None,
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
    heal: str = "none",
    heal_options: Mapping[str, Any] | None = None,
    heal_calib: str | os.PathLike | torch.Tensor | None = None,
) -> CompressionResult:
    """Compress `model` in place: every target linear becomes a LowRankLinear of its allocated rank.

    The options are :class:`~svdkit.pipeline.options.CompressionOptions` (`calib`, `calib_samples`,
    `calib_seqlen`, `calib_offset` and `seed` are its ``calibration``); this function makes the plan
    (:func:`~svdkit.pipeline.plan.make_plan`, every check before any module is touched) and runs its stages
    (:func:`run_plan`). `calib` is a spec (:mod:`svdkit.sources.mixture`: a text source, ``self``, a mixture
    like ``"wikitext2:16,demo:8"``) or 1-D token ids; `calib_samples`: 32, or a mixture's sum of counts.
    The model's config records the method, ratio, allocation and ranks, so :func:`svdkit.save` writes a
    folder that loads back as the same low-rank model. `statistics` (by full module name, from
    :func:`svdkit.calibration.collect.collect_statistics`) skips the calibration pass, for many cells.

    How calibration runs (:class:`~svdkit.pipeline.plan.CalibrationMode`): input statistics stream, each
    layer factored once its statistics are ready (``sequential=True``: from the compressed layers); ``v2``
    gets a first pass that keeps each matrix's whitened spectrum only; the ``sensitivity`` allocation and
    FWSVD's gradients spill statistics layer by layer to `statistics_dir` (:mod:`svdkit.calibration.store`).
    ``update="lstsq"`` refits each B on the calibration inputs after the method
    (:mod:`svdkit.pipeline.update`). A method with a whole-model training (``soco``) factors every target
    at the training's start ranks, then trains and fixes the final ranks within the parameter budget the
    allocation gives at `ratio` (:mod:`svdkit.methods.soco.training`).

    `kv_ratio` fixes every k_proj / v_proj at the rank that shrinks a latent KV cache by that fraction
    (:func:`~svdkit.saved.kvcache.kv_ranks`), whatever the allocation gave them, and keeps them low-rank even
    above their parameter break-even; the other targets keep the uniform allocation's ranks (another
    allocation is refused). With ``ratio=0`` only k_proj / v_proj are compressed. Load the result with
    ``kv_cache="latent"`` to cache the latents. `rank_multiple` rounds the allocated ranks to multiples of it
    within the same parameter budget (:func:`~svdkit.core.ranks.align_ranks`; SoCo rounds its final ranks);
    1 keeps the exact ranks (the papers' convention); the k/v ranks that `kv_ratio` fixes stay exact.

    `heal` (``"block"``, ``"kd"`` or ``"block,kd"``) then trains the factors toward the dense model at the
    same ranks (:mod:`svdkit.heal`; `heal_options` keyed ``NAME.KEY``, e.g. ``{"kd.max_steps": 100}``); the
    factor stage keeps the dense modules it replaces until then, so the model is held twice meanwhile;
    `heal_calib` (like `calib`) gives the healers a text of their own instead of the calibration windows.
    """
    start = time.perf_counter()
    options = CompressionOptions(
        method=method,
        ratio=ratio,
        method_options=method_options,
        allocation=allocation,
        allocation_options=allocation_options,
        update=update,
        sequential=sequential,
        kv_ratio=kv_ratio,
        rank_multiple=rank_multiple,
        heal=heal,
        heal_options=heal_options,
        heal_calib=heal_calib,
        targets=targets,
        statistics_dir=statistics_dir,
        device=device,
        progress=progress,
        calibration=CalibrationSettings(calib, calib_samples, calib_seqlen, calib_offset, seed),
    )
    return run_plan(make_plan(model, options, statistics, tokenizer), model, tokenizer, started=start)


def run_plan(
    plan: CompressionPlan,
    model: nn.Module,
    tokenizer: Any = None,
    started: float | None = None,
    texts: Mapping[str, torch.Tensor] | None = None,
) -> CompressionResult:
    """Run every stage of `plan` on `model` (the model it was made for, or a copy), in place.

    A failure during decomposition leaves the model partly compressed (reload it); statistics this run
    spilled to disk are removed whatever happens (a store the caller passed in is left alone).
    `started` (a ``time.perf_counter()`` value) counts the planning into the result's seconds. `texts`
    gives the token streams of named calibration sources (:func:`~svdkit.pipeline.stages.read_windows`).
    """
    start = time.perf_counter() if started is None else started
    timings = {"allocation": 0.0, "calibration": 0.0, "decomposition": 0.0}
    if plan.method.training is not None:
        timings["training"] = 0.0
    dense = DenseReference() if plan.heals else None
    healing: dict[str, Report] = {}
    # before any module changes: `self` text needs the dense model
    windows = read_windows(plan, tokenizer, model, texts)
    heal_windows = read_windows(plan, tokenizer, model, texts, healing=True) if plan.own_heal_text else windows
    was_training = model.training
    model.eval()
    store = None
    try:
        t = time.perf_counter()
        statistics = calibrate(plan, model, windows)
        if plan.dense_pass:  # this run's own pass (precomputed statistics stay the caller's)
            store = statistics if isinstance(statistics, StatisticsStore) else None
            timings["calibration"] = time.perf_counter() - t
        t = time.perf_counter()
        summaries = summarize(plan, model, statistics, windows)  # a summary pass counts as the allocation's
        allocation = allocate(plan, model, statistics, windows, summaries)
        timings["allocation"] = time.perf_counter() - t
        if store is not None and plan.layerwise:
            store.close()  # the dense pass served the allocation only
        factored = factor(plan, model, allocation.ranks, statistics, windows, keep=dense)
        timings["calibration"] += factored.seconds["calibration"]
        timings["decomposition"] += factored.seconds["decomposition"]
        if store is not None:
            store.close()
        t = time.perf_counter()
        ranks, training = train(plan, model, allocation)
        if plan.method.training is not None:
            timings["training"] = time.perf_counter() - t
        if plan.heals:
            t = time.perf_counter()
            healing = {**factored.healing, **heal_stage(plan, model, dense, heal_windows)}
            timings["healing"] = factored.seconds["healing"] + time.perf_counter() - t
    finally:
        model.train(was_training)
        if store is not None:
            store.close()
    dense = None  # the dense modules go before the record is made
    return record(plan, model, allocation, ranks, training, timings, time.perf_counter() - start, healing)
