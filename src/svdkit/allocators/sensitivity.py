"""Sensitivity-based truncation rank search (STRS, from ASVD: Yuan et al. 2023, arXiv 2312.05821).

For every target matrix and every kept-parameter fraction p in a grid (0.1 .. 0.9), that one matrix
alone is replaced by the method's rank-k factors (k = floor(p m n / (m + n))) and the model's
perplexity on a few calibration windows is measured. A threshold tau is then found by binary search:
each matrix takes the smallest p whose perplexity stays at or under tau (or stays dense if none does),
and tau is the smallest value for which the total parameter count meets the global target
(1 - ratio) * sum(m n). Matrices the model is sensitive to keep more rank; robust ones give more up.

Cost: (targets x distinct ranks) evaluations. Each runs the model from the changed layer on (the dense
inputs of every layer are computed once), so it costs on average half a forward of the measured
windows; methods whose factors are nested (a truncated SVD) are decomposed once per matrix. Bound it
with ``windows``, ``seqlen`` and ``grid``. The table is cached on disk, keyed by a fingerprint of the
model's parameters (names, shapes, dtypes, sums, and the edge rows of the targets), the method and its
config, the statistics it uses, the exact windows, the grid and the svdkit version, so another ratio
reuses it; a cache whose key differs is reported and ignored. Partial tables resume. The model is
moved to the device for the search (it runs the model from every layer on) and put back after.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..calibration.gradients import loss_from_layer
from ..core.fingerprint import digest, model_fingerprint
from ..core.lowrank import LowRankLinear
from ..core.options import Options, integer, number, option, path
from ..core.ranks import check_ratio, cost, rank_for_ratio
from ..engine import capture_layer_inputs, layer_bounds
from ..errors import SvdkitError, SvdkitWarning
from ..methods.base import factorize
from ..sources.models import cache_dir
from ..version import __version__
from .base import AllocationContext, register_allocator

__all__ = ["SensitivityConfig", "SensitivityTable", "measure_sensitivity", "choose_ranks", "DEFAULT_GRID"]

DEFAULT_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FORMAT = 1


def _grid(name: str, v: Any) -> tuple[float, ...]:
    grid = v if isinstance(v, list | tuple) else [v]
    try:
        if not grid:
            raise ValueError("empty")
        fractions = {float(number(0, 1, lo_open=True, hi_open=True)(name, p)) for p in grid}
    except ValueError:
        raise ValueError(f"{name} must be kept fractions strictly between 0 and 1, got {v!r}") from None
    return tuple(sorted(fractions))


@dataclass
class SensitivityConfig(Options):
    windows: int = option(2, "calibration windows measured (the first ones)", integer(1))
    seqlen: int = option(256, "tokens of each window measured (its start)", integer(2))
    grid: tuple[float, ...] = option(DEFAULT_GRID, "kept-parameter fractions tried per matrix, each in (0, 1)", _grid)
    cache: str | None = option(
        None, "table file; default: <svdkit cache>/sensitivity/<digest of the settings>.json", path()
    )


@dataclass
class SensitivityTable:
    """Calibration perplexity with each matrix alone truncated to each grid fraction."""

    key: dict[str, Any]
    grid: list[float]
    dense_ppl: float
    ppl: dict[str, list[float]]
    """full module name -> perplexity per grid fraction"""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _stats_digest(statistics: Mapping[str, Any] | None, used: frozenset[str]) -> str:
    """Fingerprint of the statistics the method uses (tokens, and sums of each value)."""
    if not statistics or not used:
        return "none"
    parts = []
    for name in sorted(statistics):
        st = statistics[name]
        parts.append(f"{name}:{st.tokens}".encode())
        for key in sorted(used & set(st.values)):
            v = st.values[key].to("cpu", torch.float64)
            parts.append(f"{key}:{float(v.sum())!r}:{float(v.abs().sum())!r}".encode())
    return digest(*parts)


def _key(context: AllocationContext, config: SensitivityConfig, ids: torch.Tensor) -> dict[str, Any]:
    """What the table depends on; a cache is only reused when every field is equal."""
    cfg = context.method_config
    return {
        "format": FORMAT,
        "svdkit": __version__,
        "model": str(getattr(getattr(context.model, "config", None), "_name_or_path", "")),
        "model_digest": model_fingerprint(context.model, context.arch),
        "method": context.method.name,
        "method_config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {},
        "statistics_digest": _stats_digest(context.statistics, context.method.requires),
        "windows_digest": digest(ids.to(torch.int64).numpy().tobytes()),
        "windows": int(ids.shape[0]),
        "seqlen": int(ids.shape[1]),
        "grid": list(config.grid),
        "targets": list(context.arch.targets),
    }


def _cache_path(config: SensitivityConfig, key: dict[str, Any]) -> Path:
    if config.cache:
        return Path(os.fspath(config.cache))
    return cache_dir() / "sensitivity" / f"{digest(json.dumps(key, sort_keys=True).encode())}.json"


def _load(path: Path, key: dict[str, Any]) -> SensitivityTable | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        table = SensitivityTable(data["key"], data["grid"], float(data["dense_ppl"]), data["ppl"])
        if not isinstance(table.ppl, dict) or any(len(v) != len(table.grid) for v in table.ppl.values()):
            raise ValueError("a matrix's row does not match the grid")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        warnings.warn(
            f"ignoring unreadable sensitivity cache {path} ({e}); measuring again", category=SvdkitWarning, stacklevel=3
        )
        return None
    if table.key != key:
        differ = sorted(k for k in set(key) | set(table.key) if key.get(k) != table.key.get(k))
        warnings.warn(
            f"ignoring sensitivity cache {path}: it was measured with other settings (different {', '.join(differ)});"
            " measuring again and replacing it",
            category=SvdkitWarning,
            stacklevel=3,
        )
        return None
    return table


def _save(path: Path, table: SensitivityTable) -> bool:
    """Write the table atomically; on failure warn and go on without a cache (returns False)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".sensitivity-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(table.to_json(), f)
        os.replace(tmp, path)
        return True
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        warnings.warn(
            f"could not write the sensitivity cache {path} ({e}); going on without it",
            category=SvdkitWarning,
            stacklevel=3,
        )
        return False


def _factors(context: AllocationContext, name: str, ranks: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The method's factors of one matrix at each rank (one decomposition when the method is nested)."""
    method, cfg, dev = context.method, context.method_config, context.device
    weight = context.model.get_submodule(name).weight
    stats = context.statistics.get(name) if context.statistics else None
    if method.nested:
        A, B, _ = factorize(method, cfg, weight, stats, max(ranks), dev, name)
        return {k: (A[:k], B[:, :k]) for k in ranks}
    return {k: factorize(method, cfg, weight, stats, k, dev, name)[:2] for k in ranks}


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0)) if math.isfinite(loss) else float("inf")


@torch.no_grad()
def measure_sensitivity(context: AllocationContext, config: SensitivityConfig) -> SensitivityTable:
    """The table of perplexities (cached on disk, see the module docstring)."""
    model, arch, dev = context.model, context.arch, context.device
    windows = context.windows
    if windows is None or windows.dim() != 2:
        raise SvdkitError("sensitivity allocation needs calibration windows")
    if windows.shape[1] < 2:
        raise SvdkitError("sensitivity allocation needs windows of at least 2 tokens")
    ids = windows[: config.windows, : config.seqlen].cpu()
    key = _key(context, config, ids)
    path = _cache_path(config, key)
    table = _load(path, key) or SensitivityTable(key, list(config.grid), float("nan"), {})
    todo = [n for n in context.shapes if n not in table.ppl]
    if not todo:
        context.report["sensitivity_cache"] = str(path)
        return table

    homes = _placement(model)
    was_training = model.training
    model.eval()
    try:
        model.to(dev)
        inputs = capture_layer_inputs(model, arch, ids[None], dev, progress=False)
        bounds = layer_bounds(arch, inputs, inputs.hidden[0], dev)  # every layer's dense input, one batch
        if not math.isfinite(table.dense_ppl):
            table.dense_ppl = _ppl(float(loss_from_layer(model, arch, ids, len(arch.layers), bounds[-1].to(dev))))
        plan = {n: sorted({rank_for_ratio(*context.shapes[n], 1.0 - p) for p in config.grid}) for n in todo}
        bar = tqdm(
            total=sum(len(r) for r in plan.values()), desc="sensitivity", unit="eval", disable=not context.progress
        )
        try:
            for name in todo:
                table.ppl[name] = _measure_matrix(context, config, name, plan[name], ids, bounds, bar)
                last_of_layer = name.removeprefix(arch.layers_path + ".").split(".", 1)[1] == arch.targets[-1]
                if last_of_layer or name == todo[-1]:
                    _save(path, table)  # after each layer: an interrupted search resumes here
        finally:
            bar.close()
    finally:
        _restore(model, homes)
        model.train(was_training)
    _save(path, table)
    context.report["sensitivity_cache"] = str(path)
    return table


def _measure_matrix(context, config, name: str, ranks: list[int], ids, bounds, bar) -> list[float]:
    """Perplexity with matrix `name` alone replaced by its factors at each of `ranks`, per grid fraction."""
    model, arch, dev = context.model, context.arch, context.device
    index, target = name[len(arch.layers_path) + 1 :].split(".", 1)
    index = int(index)
    layer = arch.layers[index]
    original = layer.get_submodule(target)
    bias = original.bias.detach() if original.bias is not None else None
    dtype = original.weight.dtype
    by_rank = {}
    for k, (A, B) in _factors(context, name, ranks).items():
        layer.set_submodule(target, LowRankLinear.from_factors(A.to(dtype), B.to(dtype), bias))
        try:
            by_rank[k] = _ppl(float(loss_from_layer(model, arch, ids, index, bounds[index].to(dev))))
        finally:
            layer.set_submodule(target, original)
        bar.update(1)
    m, n = context.shapes[name]
    return [by_rank[rank_for_ratio(m, n, 1.0 - p)] for p in config.grid]


def _placement(model) -> dict[str, torch.device]:
    return {n: t.device for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _restore(model, homes: Mapping[str, torch.device]) -> None:
    """Put every parameter and buffer back on the device it came from."""
    for name, p in model.named_parameters():
        if p.device != homes.get(name, p.device):
            p.data = p.data.to(homes[name])
    for name, b in model.named_buffers():
        if name in homes and b.device != homes[name]:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = b.to(homes[name])


def choose_ranks(
    table: SensitivityTable, shapes: Mapping[str, tuple[int, int]], ratio: float
) -> tuple[dict[str, int | None], float]:
    """Ranks meeting the budget (1 - ratio) sum(m n) at the smallest perplexity threshold; (ranks, tau).

    Each matrix takes the smallest grid fraction whose perplexity is <= tau; a matrix with none stays
    dense. The parameter count falls as tau grows, so tau is found by binary search over the measured
    perplexities.
    """
    check_ratio(ratio)
    missing = [n for n in shapes if n not in table.ppl]
    if missing:
        raise SvdkitError(f"the sensitivity table lacks {len(missing)} matrices, e.g. {missing[0]}")
    budget = (1.0 - ratio) * sum(m * n for m, n in shapes.values())
    grid = table.grid

    def pick(tau: float) -> dict[str, int | None]:
        ranks: dict[str, int | None] = {}
        for name, (m, n) in shapes.items():
            ranks[name] = next(
                (rank_for_ratio(m, n, 1.0 - p) for p, v in zip(grid, table.ppl[name], strict=True) if v <= tau), None
            )
        return ranks

    def spent(ranks: Mapping[str, int | None]) -> int:
        return sum(cost(shape, ranks[k]) for k, shape in shapes.items())

    taus = sorted({v for name in shapes for v in table.ppl[name] if math.isfinite(v)})
    if not taus or spent(pick(taus[-1])) > budget:
        raise SvdkitError(
            f"ratio {ratio} cannot be met with the sensitivity grid (smallest kept fraction {grid[0]}): "
            "use a lower ratio or add smaller fractions to the grid"
        )
    lo, hi = 0, len(taus) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if spent(pick(taus[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return pick(taus[lo]), taus[lo]


@register_allocator(
    "sensitivity",
    SensitivityConfig,
    needs_statistics=True,
    needs_windows=True,
    summary="ASVD's STRS: per-matrix perplexity on a grid, then a binary search on a perplexity threshold",
)
def allocate_sensitivity(context: AllocationContext, config: SensitivityConfig) -> dict[str, int | None]:
    floor = sum(rank_for_ratio(m, n, 1.0 - config.grid[0]) * (m + n) for m, n in context.shapes.values())
    if floor > (1.0 - context.ratio) * sum(m * n for m, n in context.shapes.values()):
        raise SvdkitError(
            f"ratio {context.ratio} cannot be met with the sensitivity grid (smallest kept fraction "
            f"{config.grid[0]}): use a lower ratio or add smaller fractions to the grid"
        )
    table = measure_sensitivity(context, config)
    ranks, tau = choose_ranks(table, context.shapes, context.ratio)
    context.report.update({"threshold_ppl": tau, "dense_calibration_ppl": table.dense_ppl})
    return ranks
