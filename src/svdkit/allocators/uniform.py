"""Uniform allocation: the same ratio for every matrix."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..core.ranks import check_ratio, rank_for_ratio, saves_parameters
from .base import AllocationContext, register_allocator

__all__ = ["UniformConfig", "allocate_uniform"]


def allocate_uniform(shapes: Mapping[str, tuple[int, int]], ratio: float) -> dict[str, int | None]:
    """The same ratio for every matrix: name -> rank, or None where the matrix should stay dense."""
    check_ratio(ratio)
    ranks: dict[str, int | None] = {}
    for name, (m, n) in shapes.items():
        k = rank_for_ratio(m, n, ratio)
        ranks[name] = k if saves_parameters(m, n, k) else None
    return ranks


@dataclass
class UniformConfig:
    """Uniform allocation has no options."""


@register_allocator("uniform", UniformConfig, summary="the same ratio for every matrix", per_matrix=False)
def _uniform(context: AllocationContext, config: UniformConfig) -> dict[str, int | None]:
    return allocate_uniform(context.shapes, context.ratio)
