"""Rank alignment: ranks rounded to multiples of 8 (or any multiple) within the allocation's budget."""

from __future__ import annotations

from conftest import cost_of

from svdkit.allocators.uniform import allocate_uniform
from svdkit.core.ranks import align_ranks


def test_largest_remainders_go_up_first_within_the_budget():
    shapes = {"a": (100, 100), "b": (100, 100), "c": (50, 30), "d": (8, 8), "e": (100, 100)}
    ranks = {"a": 21, "b": 30, "c": 13, "d": 3, "e": None}
    out = align_ranks(ranks, shapes, 8)
    # floors 16, 24, 8 free (5 + 6) * 200 + 5 * 80 = 2600; remainders b 6, a 5, c 5: b up (1600), then
    # a would need 1600 of the 1000 left, c 640 fits; rank 3 < 8 and the dense matrix stay as they are
    assert out == {"a": 16, "b": 32, "c": 16, "d": 3, "e": None}
    assert cost_of(out, shapes) <= cost_of(ranks, shapes)
    assert align_ranks(ranks, shapes, 1) == ranks


def test_alignment_never_rounds_past_the_break_even_rank():
    shapes = {"a": (16, 16), "b": (64, 32)}  # a's break-even rank is 8: rank 8 saves nothing
    ranks = {"a": 7, "b": 15}
    out = align_ranks(ranks, shapes, 4)
    assert out["a"] == 4 and out["b"] == 16  # a comes first (same remainder) but may not reach 8
    assert cost_of(out, shapes) <= cost_of(ranks, shapes)


def test_limits_cap_a_raise():
    shapes = {"a": (100, 100), "b": (100, 100)}
    out = align_ranks({"a": 7 + 8, "b": 14}, shapes, 4, limits={"a": 15})
    assert out == {"a": 12, "b": 16}  # a may not go up to 16 (only 15 components); b takes the spare


def test_uniform_smollm2_shapes_stay_within_budget_and_aligned():
    shapes = {}
    for i in range(30):
        shapes |= {f"{i}.q": (576, 576), f"{i}.k": (192, 576), f"{i}.gate": (1536, 576), f"{i}.down": (576, 1536)}
    for ratio in (0.2, 0.4, 0.6):
        exact = allocate_uniform(shapes, ratio)
        for multiple in (8, 16):
            out = align_ranks(exact, shapes, multiple)
            assert all(k % multiple == 0 for k in out.values())
            left = cost_of(exact, shapes) - cost_of(out, shapes)
            assert 0 <= left < multiple * 2112  # less than one more step of the widest matrix is left
            assert all(abs(out[n] - exact[n]) < multiple for n in shapes)
