"""The rank rule, the break-even rank and the ratio check (exact arithmetic)."""

from __future__ import annotations

import pytest

from svdkit import SvdkitError
from svdkit.allocators.uniform import allocate_uniform
from svdkit.core.ranks import break_even_rank, check_ratio, rank_for_ratio, saves_parameters

pytestmark = pytest.mark.usefixtures("float64_default")


@pytest.mark.parametrize(
    "m,n,ratio,expected",
    [
        (576, 576, 0.2, 230),
        (192, 576, 0.4, 86),
        (1536, 576, 0.6, 167),
        (576, 1536, 0.2, 335),
        (10, 10, 0.99, 1),
        (300, 300, 0.3, 105),
    ],  # 300 * 300 * 0.7 / 600 is exactly 105, though float arithmetic gives 104.99999
)
def test_rank_for_ratio_formula(m, n, ratio, expected):
    assert rank_for_ratio(m, n, ratio) == expected


def test_break_even_and_dense_fallback():
    assert break_even_rank(6, 3) == 2
    assert saves_parameters(6, 3, 1) and not saves_parameters(6, 3, 2)
    # a 1 x 8 row: even rank 1 costs 9 > 8 numbers, so it stays dense
    ranks = allocate_uniform({"row": (1, 8), "square": (8, 8)}, 0.5)
    assert ranks == {"row": None, "square": 2}


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_ratio_outside_open_interval_is_refused(bad):
    with pytest.raises(SvdkitError, match="strictly between 0 and 1"):
        check_ratio(bad)
