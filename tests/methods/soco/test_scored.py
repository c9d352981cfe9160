"""SoCo's scored layers on small matrices: folding, the count penalty and its dual step, pruning by
score, and the kept components aligned to a rank multiple."""

from __future__ import annotations

import pytest
import torch

import svdkit
from svdkit import LowRankLinear
from svdkit.methods.soco.scored import (
    ScoredLinear,
    align_keep,
    dual_step,
    fold_scores,
    penalty_grad,
    prune_to_budget,
    soft_count,
)


def _low(m=6, n=5, k=4, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(k, n, generator=g), torch.randn(m, k, generator=g)
    return LowRankLinear.from_factors(A, B, torch.randn(m, generator=g) if bias else None)


def test_scores_at_one_without_pruning_equal_the_start_decomposition():
    low = _low()
    x = torch.randn(3, 5)
    scored = ScoredLinear(low)
    assert torch.equal(scored(x), low(x))
    folded = fold_scores(scored)
    assert folded.rank == low.rank
    assert torch.allclose(folded(x), low(x), atol=1e-6)


def test_fold_keeps_the_masked_components_with_their_scores():
    low = _low()
    scored = ScoredLinear(low)
    with torch.no_grad():
        scored.score.copy_(torch.tensor([2.0, 0.5, 1.0, 3.0]))
        scored.mask.copy_(torch.tensor([True, False, True, True]))
    keep = torch.tensor([0, 2, 3])
    expected = low.B[:, keep] @ torch.diag(torch.tensor([2.0, 1.0, 3.0])) @ low.A[keep]
    folded = fold_scores(scored)
    assert folded.rank == 3
    assert torch.allclose(folded.dense_weight(), expected, atol=1e-5)
    x = torch.randn(2, 5)
    assert torch.allclose(folded(x), scored(x), atol=1e-5)


def test_penalty_gradient_is_cost_weighted_up_to_one_and_zero_above():
    scores = torch.tensor([0.5, 0.99, 1.0, 2.5, 0.0], dtype=torch.float64)
    costs = torch.tensor([10.0, 30.0, 10.0, 30.0, 20.0], dtype=torch.float64)
    g = penalty_grad(scores, costs, 2.0)  # at 1 itself the penalty pulls (else untrained scores never move)
    assert torch.allclose(g, torch.tensor([1.0, 3.0, 1.0, 0.0, 2.0], dtype=torch.float64))
    assert soft_count(scores, costs) == 0.5 * 10 + 0.99 * 30 + 10 + 30


def test_dual_step_raises_the_penalty_above_target_and_never_below_zero():
    assert dual_step(0.5, soft=120.0, target=100.0, span=40.0, rate=2.0) == 1.5
    assert dual_step(0.5, soft=80.0, target=100.0, span=40.0, rate=2.0) == 0.0
    assert dual_step(0.0, soft=100.0, target=100.0, span=40.0, rate=2.0) == 0.0


def test_penalty_in_the_gradient_drops_the_least_loss_per_parameter_first():
    """On a separable quadratic loss sum h (s - 1)^2 / 2, Adam with the penalty in the gradient settles
    at s = 1 - lam w / h: the scores fall to 0 in the order of h / w (loss held per parameter), not of
    h alone (the order a proximal step after Adam's normalised step would not see)."""
    h = torch.tensor([4.0, 1.0, 3.0, 0.5], dtype=torch.float64)
    costs = torch.tensor([10.0, 10.0, 40.0, 10.0], dtype=torch.float64)  # w = 4 / 7, 4 / 7, 16 / 7, 4 / 7
    s = torch.ones(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([s], lr=0.01)
    for _ in range(1500):
        opt.zero_grad()
        (0.5 * h * (s - 1) ** 2).sum().backward()
        with torch.no_grad():
            s.grad += penalty_grad(s.detach(), costs, 1.0)
        opt.step()
        with torch.no_grad():
            s.clamp_(min=0)
    w = costs / costs.mean()
    expected = (1 - w / h).clamp(min=0)  # [6 / 7, 3 / 7, 5 / 21, 0]
    assert torch.allclose(s.detach(), expected, atol=0.03)
    assert s[2] < s[1] < s[0]  # the costly matrix's component goes before the cheap one of lower h


def test_pruning_follows_scores_not_singular_value_order():
    # one matrix, components in singular-value order; the scores prefer the last ones
    scores = torch.tensor([0.1, 0.2, 0.9, 1.5])
    costs = torch.full((4,), 11.0)
    owner = torch.zeros(4, dtype=torch.long)
    keep = prune_to_budget(scores, costs, owner, budget=25.0)
    assert keep.tolist() == [False, False, True, True]


def test_pruning_meets_the_budget_and_keeps_one_component_per_matrix():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(40, generator=g)
    owner = torch.arange(40) // 10  # four matrices of 10 components
    costs = torch.tensor([7.0, 13.0, 29.0, 50.0]).repeat_interleave(10)
    scores[30:] = 0.0  # the expensive matrix scores nothing, but keeps its best component
    budget = 400.0
    keep = prune_to_budget(scores, costs, owner, budget)
    spent = float(costs[keep].sum())
    assert budget - float(costs.max()) < spent <= budget
    assert all(keep[owner == i].any() for i in range(4))
    with pytest.raises(svdkit.SvdkitError, match="one component per matrix"):
        prune_to_budget(scores, costs, owner, budget=90.0)


def test_align_keep_keeps_the_best_scored_components_per_matrix():
    owner = torch.tensor([0] * 6 + [1] * 6)
    shapes = [(10, 10), (10, 10)]  # 6 components of cost 20 each; break-even rank 5 (6 is start only)
    scores = torch.tensor([0.9, 0.1, 0.8, 0.7, -1.0, 0.6, 0.5, 0.4, 0.3, 0.2, 0.05, 0.01])
    keep = torch.tensor([True, False, True, True, False, False, True, True, True, False, False, False])
    out = align_keep(keep, scores, owner, shapes, 2)
    # counts 3 and 3 (remainder 1 each): floors 2 + 2 free 40, so matrix 0 goes back up to 4 with its
    # best unkept score (0.6 at position 5; the -1 stays out); matrix 1 drops its weakest kept one
    assert out.tolist() == [True, False, True, True, False, True, True, True, False, False, False, False]


def test_align_keep_caps_counts_at_the_components_and_may_revive_pruned_ones():
    owner = torch.tensor([0] * 8 + [1] * 7)
    shapes = [(100, 100)] * 2  # 200 parameters a component
    scores = torch.ones(15)
    scores[5:8] = -1.0  # matrix 0: three components pruned earlier
    keep = scores >= 0
    out = align_keep(keep, scores, owner, shapes, 4)
    # counts 5 and 7 -> floors 4 and 4, 800 spare; matrix 1 (remainder 3) has only 7 components, so
    # matrix 0 goes up to 8 and takes back its pruned components
    assert [int(out[owner == o].sum()) for o in range(2)] == [8, 4]
    assert out[5:8].all() and int(out.sum()) * 200 <= int(keep.sum()) * 200
