"""Rank allocation: how many singular components each target matrix keeps.

Ratio is the fraction of a matrix's parameters removed (SVD-LLM's convention): a matrix W (m x n)
at ratio r keeps rank k = floor(m n (1 - r) / (m + n)), floored at 1. A rank-k pair costs k (m + n)
parameters, so it only pays while k (m + n) < m n; where it would not, the matrix stays dense.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from .errors import SvdkitError

__all__ = ["rank_for_ratio", "break_even_rank", "saves_parameters", "check_ratio", "allocate_uniform"]


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
