"""Rank allocation: how many singular components each target matrix keeps.

Ratio is the fraction of a matrix's parameters removed (SVD-LLM's convention): a matrix W (m x n)
at ratio r keeps rank k = floor(m n (1 - r) / (m + n)), floored at 1. A rank-k pair costs k (m + n)
parameters, so it only pays while k (m + n) < m n; where it would not, the matrix stays dense.

An *allocator* chooses every target's rank for a global ratio. Allocators are registered by name
(:func:`register_allocator`) with a small config, like methods; the pipeline calls them with an
:class:`AllocationContext`. ``uniform`` (this module) needs nothing but the shapes; ``sensitivity``
(:mod:`svdkit.sensitivity`) needs the method, the statistics and calibration windows; ``v2``
(:mod:`svdkit.heterogeneous`) needs every matrix's input Gram matrix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .configs import build_config
from .errors import SvdkitError

__all__ = [
    "rank_for_ratio",
    "break_even_rank",
    "saves_parameters",
    "check_ratio",
    "allocate_uniform",
    "align_ranks",
    "check_rank_multiple",
    "AllocationContext",
    "Allocator",
    "register_allocator",
    "get_allocator",
    "allocator_names",
    "make_allocation_config",
]


def check_ratio(ratio: float) -> float:
    """Validate a compression ratio (fraction of parameters removed), which must lie in (0, 1)."""
    if not isinstance(ratio, int | float) or not math.isfinite(ratio) or not 0.0 < ratio < 1.0:
        raise SvdkitError(f"ratio must be strictly between 0 and 1 (the fraction of parameters removed), got {ratio!r}")
    return float(ratio)


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """k = floor(m n (1 - ratio) / (m + n)), at least 1 (rank 0 would delete the matrix).

    A tolerance of 1e-9 keeps exact integers exact despite float rounding (300 x 300 at 0.3 is 105).
    """
    return max(1, math.floor(m * n * (1.0 - ratio) / (m + n) + 1e-9))


def break_even_rank(m: int, n: int) -> float:
    """The rank m n / (m + n) at which a low-rank pair costs as much as the dense matrix."""
    return m * n / (m + n)


def saves_parameters(m: int, n: int, rank: int) -> bool:
    """True when a rank-`rank` pair (rank (m + n) numbers) is smaller than the dense m x n matrix."""
    return rank * (m + n) < m * n


def allocate_uniform(shapes: Mapping[str, tuple[int, int]], ratio: float) -> dict[str, int | None]:
    """The same ratio for every matrix: name -> rank, or None where the matrix should stay dense."""
    check_ratio(ratio)
    ranks: dict[str, int | None] = {}
    for name, (m, n) in shapes.items():
        k = rank_for_ratio(m, n, ratio)
        ranks[name] = k if saves_parameters(m, n, k) else None
    return ranks


def check_rank_multiple(multiple: int) -> int:
    """Validate the rank alignment: a positive integer (1 keeps the ranks exact)."""
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise SvdkitError(f"rank_multiple must be a positive integer (1 keeps the ranks exact), got {multiple!r}")
    return multiple


def align_ranks(
    ranks: Mapping[str, int | None],
    shapes: Mapping[str, tuple[int, int]],
    multiple: int,
    limits: Mapping[str, int] | None = None,
) -> dict[str, int | None]:
    """Ranks rounded to multiples of `multiple` within the parameter budget that `ranks` spend.

    Matrix products run faster when the rank is a multiple of 8 or 16 (vector width on CPUs, tensor
    cores on GPUs): a rank-251 layer can be slower than a rank-256 one. Largest-remainder rounding:
    every rank k >= `multiple` goes down to multiple * floor(k / multiple); then, by decreasing
    remainder k mod `multiple` (ties in model order), ranks go back up by `multiple` while the total
    cost sum k (m + n) stays within that of `ranks` and the matrix still saves parameters. Ranks below
    `multiple` and dense matrices (None) are left as they are, so no matrix is deleted. `limits` caps
    a rank where fewer components exist (SoCo's start decomposition).
    """
    multiple = check_rank_multiple(multiple)
    out = dict(ranks)
    if multiple == 1:
        return out
    spare = 0
    remainders = []
    for i, (name, k) in enumerate(ranks.items()):
        if k is None or k < multiple:
            continue
        m, n = shapes[name]
        r = k % multiple
        out[name] = k - r
        spare += r * (m + n)
        if r:
            remainders.append((-r, i, name))
    for _, _, name in sorted(remainders):
        m, n = shapes[name]
        up = out[name] + multiple
        fits = limits is None or name not in limits or up <= limits[name]
        if fits and multiple * (m + n) <= spare and saves_parameters(m, n, up):
            out[name] = up
            spare -= multiple * (m + n)
    return out


@dataclass
class AllocationContext:
    """Everything an allocator may use. Fields an allocator does not declare a need for may be None."""

    shapes: dict[str, tuple[int, int]]
    """full module name -> (out_features, in_features) of every target"""
    ratio: float
    model: Any = None
    arch: Any = None
    method: Any = None
    """the :class:`~svdkit.methods.Method` that will factor the matrices"""
    method_config: Any = None
    statistics: Mapping[str, Any] | None = None
    """full module name -> LinearStats (None when the method needs none)"""
    windows: Any = None
    """calibration token windows (n x seqlen)"""
    calibration: dict | None = None
    """how the windows and statistics were made (for the allocator's own records)"""
    device: Any = None
    progress: bool = True
    rank_multiple: int = 1
    """ranks are rounded to multiples of this within the budget (:func:`align_ranks`); a method that fixes
    its final ranks itself (SoCo) applies it there"""
    report: dict = dataclasses.field(default_factory=dict)
    """what the allocator wants recorded next to the ranks (e.g. a threshold it chose)"""


@dataclass(frozen=True)
class Allocator:
    name: str
    allocate: Callable[[AllocationContext, Any], dict[str, int | None]]
    config_cls: type
    needs_statistics: bool
    """True when every matrix's statistics must exist before any rank is fixed"""
    needs_windows: bool
    summary: str
    requires: frozenset[str] = frozenset()
    """statistics the allocator itself reads (collected even when the method needs none)"""


_ALLOCATORS: dict[str, Allocator] = {}


def register_allocator(
    name: str,
    config_cls: type,
    needs_statistics: bool = False,
    needs_windows: bool = False,
    summary: str = "",
    requires: tuple[str, ...] = (),
):
    """Decorator: register `fn(context, config) -> {name: rank or None}` as allocation strategy `name`."""

    def wrap(fn):
        if name in _ALLOCATORS:
            raise ValueError(f"allocator '{name}' is already registered")
        _ALLOCATORS[name] = Allocator(
            name, fn, config_cls, needs_statistics, needs_windows, summary, frozenset(requires)
        )
        return fn

    return wrap


def allocator_names() -> list[str]:
    return sorted(_ALLOCATORS)


def get_allocator(name: str) -> Allocator:
    if name not in _ALLOCATORS:
        raise SvdkitError(f"unknown allocation '{name}'; known: {', '.join(allocator_names())}")
    return _ALLOCATORS[name]


def make_allocation_config(allocator: Allocator, options: Mapping[str, Any] | None = None) -> Any:
    """The allocator's config dataclass from a mapping, with clear errors for unknown keys or bad values."""
    return build_config(allocator.config_cls, options, f"allocation '{allocator.name}'")


@dataclass
class UniformConfig:
    """Uniform allocation has no options."""


@register_allocator("uniform", UniformConfig, summary="the same ratio for every matrix")
def _uniform(context: AllocationContext, config: UniformConfig) -> dict[str, int | None]:
    return allocate_uniform(context.shapes, context.ratio)
