"""SoCo: scored layers, the count penalty, pruning by score, folding, the three-stage training and
its failure modes, on small matrices and tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_tokens, tiny_model

import svdkit
from svdkit import LowRankLinear, rank_for_ratio
from svdkit.cli import main
from svdkit.methods.soco import SoCoConfig, start_ranks
from svdkit.methods.soco.scored import (
    ScoredLinear,
    ScoredModel,
    dual_step,
    fold_scores,
    penalty_grad,
    prune_to_budget,
    soft_count,
)
from svdkit.methods.soco.training import soco_loss


def _low(m=6, n=5, k=4, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(k, n, generator=g), torch.randn(m, k, generator=g)
    return LowRankLinear.from_factors(A, B, torch.randn(m, generator=g) if bias else None)


def _compress(model, **kw):
    calib = random_tokens(8 * 64, seed=1)
    opts = dict(calib=calib, calib_samples=8, calib_seqlen=64, device="cpu", progress=False)
    return svdkit.compress(model, **{**opts, **kw})


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


def test_start_ranks_save_parameters():
    shapes = {"a": (64, 64), "b": (16, 64), "c": (10, 10)}
    ranks = start_ranks(shapes, SoCoConfig())
    assert ranks == {"a": 31, "b": 12, "c": 4}  # floor(m n / (m + n)) lowered while k (m + n) >= m n
    assert start_ranks(shapes, SoCoConfig(start_ratio=0.2))["a"] == rank_for_ratio(64, 64, 0.2)


def test_soco_meets_the_budget_reallocates_and_round_trips(tmp_path, tiny_tokenizer):
    log = tmp_path / "curve.jsonl"
    model = tiny_model("llama")
    uniform = _compress(tiny_model("llama"), method="svd-llm-v2", ratio=0.4, rank_multiple=1)
    options = {"steps": 12, "seqlen": 32, "log": str(log)}
    r = _compress(model, method="soco", ratio=0.4, method_options=options, rank_multiple=1)
    shapes = svdkit.find_architecture(tiny_model("llama")).shapes()
    budget = sum(k * sum(shapes[n]) for n, k in uniform.ranks.items())
    kept = sum(k * sum(shapes[n]) for n, k in r.ranks.items())
    assert r.training["budget"] == budget and r.training["kept"] == kept
    assert budget - max(m + n for m, n in shapes.values()) < kept <= budget
    assert r.params == uniform.params - (budget - kept)
    assert r.ranks != uniform.ranks  # the global budget moves rank between matrices
    stages = [row["stage"] for row in r.training["curve"]]
    assert stages == ["coarse"] * 6 + ["refine"] * 4 + ["final"] * 2
    curve = r.training["curve"]
    assert curve[0]["soft"] > curve[5]["soft"] and max(row["penalty"] for row in curve[:6]) > 0
    assert curve[5]["target"] == curve[9]["target"] == curve[11]["target"]  # the coarse stage ends at the budget
    refine = [row["kept"] for row in curve[5:10]]
    assert all(a >= b for a, b in zip(refine, refine[1:], strict=False))  # the hard count falls step by step...
    assert curve[6]["kept"] > curve[9]["target"] >= curve[9]["kept"]  # ...to the budget at the refine's end
    assert all(row["penalty"] == 0 and row["kept"] == curve[9]["kept"] for row in curve[10:])
    assert [row["lr"] for row in curve[9:]] == [0.02, 0.02, 0.01]  # annealed in the final stage
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [row["step"] for row in lines] == list(range(1, 13))
    assert all(p.requires_grad for p in model.parameters())  # nothing left frozen
    record = model.config.quantization_config
    assert record.method == "soco" and record.training["kept"] == kept and "curve" not in record.training
    ids = random_tokens(30, seed=3)[None]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    svdkit.save(model, tiny_tokenizer, tmp_path / "out")
    loaded, _ = svdkit.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_soco_final_stage_lowers_the_loss_on_its_windows():
    """Two runs share their first four steps (same windows, same pruning); the one that goes on
    training the kept scores after pruning ends with a lower loss on the calibration windows."""
    from svdkit.sources.text import calibration_windows

    windows = calibration_windows(random_tokens(8 * 64, seed=1), 8, 64, 0, 0)

    def loss(m):
        with torch.no_grad():
            return float(m(input_ids=windows, labels=windows).loss)

    pruned, trained = tiny_model("llama"), tiny_model("llama")
    a = _compress(
        pruned, method="soco", ratio=0.4, method_options={"steps": 4, "coarse": 0.5, "refine": 0.5, "lr": 0.05}
    )
    b = _compress(
        trained, method="soco", ratio=0.4, method_options={"steps": 44, "coarse": 1 / 22, "refine": 1 / 22, "lr": 0.05}
    )
    assert [row["stage"] for row in b.training["curve"][:5]] == ["coarse"] * 2 + ["refine"] * 2 + ["final"]
    assert a.ranks == b.ranks  # the same pruning
    assert loss(trained) < loss(pruned)


def test_untrained_scores_prune_every_matrix_alike():
    """With no projected step all scores are 1: ties go by position inside each matrix, so the ranks
    stay spread over all matrices instead of whole matrices kept in model order."""
    options = {"steps": 2, "coarse": 0, "refine": 0}
    r = _compress(tiny_model("llama"), method="soco", ratio=0.4, method_options=options, rank_multiple=1)
    assert min(r.ranks.values()) > 1
    assert max(r.ranks.values()) - min(r.ranks.values()) <= 2


def test_soco_under_no_grad_still_trains(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        r = _compress(model, method="soco", ratio=0.4, method_options={"steps": 3})
    assert len(r.training["curve"]) == 3
    with pytest.raises(svdkit.SvdkitError, match="does not exist"):
        _compress(tiny_model("llama"), method="soco", ratio=0.4, method_options={"log": str(tmp_path / "no" / "x")})


def test_soco_rejects_targets_it_cannot_reach():
    with pytest.raises(svdkit.SvdkitError, match="SoCo can only prune"):
        _compress(tiny_model("llama"), method="soco", ratio=0.2, method_options={"start_ratio": 0.5, "steps": 2})


def test_soco_stops_on_a_non_finite_loss_and_restores_the_layers(monkeypatch):
    calls = {"n": 0}
    forward = ScoredLinear.forward

    def poisoned(self, x):
        calls["n"] += 1
        y = forward(self, x)
        return y * float("nan") if calls["n"] > 30 else y

    monkeypatch.setattr(ScoredLinear, "forward", poisoned)
    model = tiny_model("llama")
    with pytest.raises(svdkit.SvdkitError, match="diverged at step 3 .*lower lr"):
        _compress(model, method="soco", ratio=0.4, method_options={"steps": 6})
    assert not any(isinstance(m, ScoredLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_cli_soco_divergence_writes_nothing(tmp_path, tiny_folder, monkeypatch, capsys):
    monkeypatch.setattr(ScoredLinear, "forward", lambda self, x: torch.full_like(self.low(x), float("nan")))
    out = tmp_path / "out"
    code = main(
        [
            "compress",
            str(tiny_folder),
            "--method",
            "soco",
            "--ratio",
            "0.4",
            "--calib",
            "demo",
            "--calib-samples",
            "2",
            "--calib-seqlen",
            "64",
            "--option",
            "steps=3",
            "--output",
            str(out),
        ]
    )
    assert code == 2
    assert "diverged at step 1" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_kd_loss_is_zero_at_the_start_and_positive_once_scores_move():
    """The kd teacher is the start decomposition: with every score at 1 and nothing pruned the student
    is the teacher (KL 0); a moved score makes the KL positive, and its gradient reaches the scores."""
    model = tiny_model("llama")
    _compress(model, method="svd-llm", ratio=0.2, rank_multiple=1)
    names = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    wrapped = ScoredModel(model, names)
    wrapped.install(model)
    scored = wrapped.scored
    ids = random_tokens(24, seed=7)[None]
    assert float(soco_loss(model, wrapped, ids, "kd").detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for s in scored.values():
            s.score.mul_(0.5)
    kl = soco_loss(model, wrapped, ids, "kd")
    kl.backward()
    assert float(kl.detach()) > 1e-7 and scored[names[0]].score.grad.abs().sum() > 0  # a tiny random model: small KL
    assert not any(s.start for s in scored.values())  # the teacher switch is off again
    ce = soco_loss(model, wrapped, ids, "ce")
    assert float(ce.detach()) == pytest.approx(float(model(input_ids=ids, labels=ids).loss.detach()))


def test_soco_kd_meets_the_budget():
    shapes = svdkit.find_architecture(tiny_model("llama")).shapes()
    options = {"steps": 6, "seqlen": 32, "loss": "kd"}
    r = _compress(tiny_model("llama"), method="soco", ratio=0.4, method_options=options, rank_multiple=1)
    budget = sum(k * sum(shapes[n]) for n, k in svdkit.allocate_uniform(shapes, 0.4).items())
    assert r.training["budget"] == budget and budget - max(m + n for m, n in shapes.values()) < r.training["kept"]
    assert r.training["kept"] <= budget and all(row["loss"] > -1e-6 for row in r.training["curve"])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"log": "/nonexistent-folder/curve.jsonl"}, "does not exist"),
        ({"base": "asvd"}, "needs statistics"),
        ({"base": "nope"}, "unknown base"),
        ({"coarse": 0.8, "refine": 0.5}, "sum <= 1"),
        ({"lr": 0}, "lr must be positive"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"penalty_lr": 0}, "penalty_lr must be positive"),
        ({"anneal": "yes"}, "anneal must be true or false"),
        ({"loss": "mse"}, "loss must be 'ce' or 'kd'"),
    ],
)
def test_soco_config_errors(options, message):
    with pytest.raises(svdkit.SvdkitError, match=message):
        svdkit.methods.make_config(svdkit.get_method("soco"), options)


def test_cli_soco_writes_its_curve_and_info_plots_it(tmp_path, tiny_folder, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    args = ["compress", str(tiny_folder), "--method", "soco", "--ratio", "0.4", "--calib-samples", "2"]
    args += ["--calib-seqlen", "64", "--option", "steps=4", "--option", "seqlen=32", "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "training: 4 steps" in printed and "chosen ranks by module type" in printed
    curve = json.loads((out / "training_curve.json").read_text())
    assert [row["step"] for row in curve] == [1, 2, 3, 4]
    png = tmp_path / "curve.png"
    assert main(["info", str(out), "--plot-curve", str(png)]) == 0
    assert "training: 4 steps" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (out / "training_curve.json").unlink()
    assert main(["info", str(out), "--plot-curve", str(png)]) == 2
    assert "no training_curve.json" in capsys.readouterr().err
