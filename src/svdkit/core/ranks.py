"""Rank arithmetic: ratio to rank, the parameter break-even, and aligning ranks to a multiple.

Ratio is the fraction of a matrix's parameters removed (SVD-LLM's convention): a matrix W (m x n)
at ratio r keeps rank k = floor(m n (1 - r) / (m + n)), floored at 1. A rank-k pair costs k (m + n)
parameters, so it only pays while k (m + n) < m n; where it would not, the matrix stays dense.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..errors import SvdkitError
from .options import integer, number

__all__ = [
    "rank_for_ratio",
    "break_even_rank",
    "saves_parameters",
    "check_fraction",
    "check_ratio",
    "align_ranks",
    "check_rank_multiple",
    "cost",
]


def check_fraction(value: float, name: str, meaning: str) -> float:
    """Validate a fraction strictly between 0 and 1; the error says what it means."""
    try:
        return float(number(0, 1, lo_open=True, hi_open=True)(name, value))
    except ValueError:
        raise SvdkitError(f"{name} must be strictly between 0 and 1 ({meaning}), got {value!r}") from None


def check_ratio(ratio: float) -> float:
    """Validate a compression ratio (fraction of parameters removed), which must lie in (0, 1)."""
    return check_fraction(ratio, "ratio", "the fraction of parameters removed")


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


def check_rank_multiple(multiple: int) -> int:
    """Validate the rank alignment: a positive integer (1 keeps the ranks exact)."""
    try:
        return integer(1)("rank_multiple", multiple)
    except ValueError as e:
        raise SvdkitError(f"{e} (1 keeps the ranks exact)") from None


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


def cost(shape: tuple[int, int], rank: int | None) -> int:
    """Parameters of an m x n matrix kept at `rank` (k (m + n)), or dense (m n) when rank is None."""
    m, n = shape
    return m * n if rank is None else rank * (m + n)
