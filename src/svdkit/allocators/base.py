"""What every allocator is: a function (context, config) -> {target: rank or None}, registered by name.

An *allocator* chooses every target's rank for a global ratio. Allocators are registered by name
(:data:`ALLOCATORS`) with a small config, like methods; the pipeline calls them with an
:class:`AllocationContext` and aligns or fixes ranks afterwards itself. ``uniform`` needs nothing but
the shapes; ``sensitivity`` needs the method, the statistics and calibration windows; ``v2`` needs a
summary of every matrix (its whitened singular values).

An allocator that declares ``summarize`` keeps only a small summary of each matrix: the pipeline calls
``summarize(weights, statistics, config, device, method, method_config)`` for one decoder layer at a time,
as soon as that layer's statistics exist, and hands every summary (a tensor per target, kept on the CPU
and, by a streamed run, on disk) to the allocator in ``context.summaries``. The
statistics are then dropped, and the factors are computed in a second calibration pass, layer by layer
as with uniform ranks: no matrix's statistics outlive its layer, and a model folder compresses streamed.
An allocator with ``needs_statistics`` and no ``summarize`` reads ``context.statistics`` whole (spilled
to disk by the pipeline).

An allocator that declares ``corrects_base`` (``bytes``) chooses the ranks of a method whose pair corrects a
stored base (the method's :class:`~svdkit.methods.base.StoredBase`, qlr's quantized Q) under a byte budget,
in place of the method's own ranks; the parameter ratio does not apply.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..core.options import build_config
from ..core.registry import Registry

__all__ = [
    "ALLOCATORS",
    "AllocationContext",
    "Allocator",
    "Summarize",
    "register_allocator",
    "get_allocator",
    "allocator_names",
    "make_allocation_config",
]


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
    """full module name -> LinearStats (None when the method needs none, or the allocator summarizes)"""
    summaries: Mapping[str, Any] | None = None
    """full module name -> what the allocator's ``summarize`` kept of it (None for other allocators)"""
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


Summarize = Callable[[Mapping[str, Any], Mapping[str, Any], Any, Any, Any, Any], dict[str, Any]]
"""what an allocator keeps of one layer's matrices: (weights, statistics, config, device, method, method_config)
-> {name: summary}"""


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
    summarize: Summarize | None = None
    """(weights, statistics, config, device, method, method_config) -> {name: summary} for one layer's targets"""
    per_matrix: bool = True
    """True when the ranks differ matrix by matrix within one budget (a rank map shows them; ranks fixed
    from outside, the latent cache's k/v ranks, would break the budget); False: one ratio for every matrix"""
    corrects_base: bool = False
    """True when it chooses the ranks of a method's correction to a stored base (its ``base``) under a byte
    budget, in place of the method's own ranks"""
    check: Callable[[Mapping[str, tuple[int, int]], Any, Any, Any, int], None] | None = None
    """(shapes, config, method, method_config, rank_multiple): raises SvdkitError when the allocation cannot be
    met, as the plan is made (before any calibration)"""


ALLOCATORS: Registry[Allocator] = Registry("allocation")


def register_allocator(
    name: str,
    config_cls: type,
    needs_statistics: bool = False,
    needs_windows: bool = False,
    summary: str = "",
    requires: tuple[str, ...] = (),
    summarize: Summarize | None = None,
    per_matrix: bool = True,
    corrects_base: bool = False,
    check: Callable[[Mapping[str, tuple[int, int]], Any, Any, Any, int], None] | None = None,
):
    """Decorator: register `fn(context, config) -> {name: rank or None}` as allocation strategy `name`."""

    def wrap(fn):
        allocator = Allocator(
            name,
            fn,
            config_cls,
            needs_statistics,
            needs_windows,
            summary,
            frozenset(requires),
            summarize,
            per_matrix,
            corrects_base,
            check,
        )
        ALLOCATORS.add(name, allocator)
        return fn

    return wrap


def allocator_names() -> list[str]:
    return ALLOCATORS.names()


def get_allocator(name: str) -> Allocator:
    return ALLOCATORS.get(name)


def make_allocation_config(allocator: Allocator, options: Mapping[str, Any] | None = None) -> Any:
    """The allocator's config dataclass from a mapping, with clear errors for unknown keys or bad values."""
    return build_config(allocator.config_cls, options, f"allocation '{allocator.name}'")
