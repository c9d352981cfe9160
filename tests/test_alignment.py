"""Rank alignment: ranks rounded to multiples of 8 (or any multiple) within the allocation's budget."""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens, tiny_model

import svdkit
from svdkit.allocators.uniform import allocate_uniform
from svdkit.cli import main
from svdkit.core.ranks import align_ranks
from svdkit.methods.soco.scored import align_keep


def _cost(ranks, shapes):
    return sum(m * n if ranks[k] is None else ranks[k] * (m + n) for k, (m, n) in shapes.items())


def test_largest_remainders_go_up_first_within_the_budget():
    shapes = {"a": (100, 100), "b": (100, 100), "c": (50, 30), "d": (8, 8), "e": (100, 100)}
    ranks = {"a": 21, "b": 30, "c": 13, "d": 3, "e": None}
    out = align_ranks(ranks, shapes, 8)
    # floors 16, 24, 8 free (5 + 6) * 200 + 5 * 80 = 2600; remainders b 6, a 5, c 5: b up (1600), then
    # a would need 1600 of the 1000 left, c 640 fits; rank 3 < 8 and the dense matrix stay as they are
    assert out == {"a": 16, "b": 32, "c": 16, "d": 3, "e": None}
    assert _cost(out, shapes) <= _cost(ranks, shapes)
    assert align_ranks(ranks, shapes, 1) == ranks


def test_alignment_never_rounds_past_the_break_even_rank():
    shapes = {"a": (16, 16), "b": (64, 32)}  # a's break-even rank is 8: rank 8 saves nothing
    ranks = {"a": 7, "b": 15}
    out = align_ranks(ranks, shapes, 4)
    assert out["a"] == 4 and out["b"] == 16  # a comes first (same remainder) but may not reach 8
    assert _cost(out, shapes) <= _cost(ranks, shapes)


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
            left = _cost(exact, shapes) - _cost(out, shapes)
            assert 0 <= left < multiple * 2112  # less than one more step of the widest matrix is left
            assert all(abs(out[n] - exact[n]) < multiple for n in shapes)


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "8"])
def test_bad_multiple_is_a_clear_error_before_any_work(bad):
    model = tiny_model("llama")
    with pytest.raises(svdkit.SvdkitError, match="rank_multiple must be a positive integer"):
        svdkit.compress(model, method="svd", ratio=0.4, rank_multiple=bad, progress=False)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"


def test_compress_records_the_multiple_and_exact_ranks_with_one():
    calib = random_tokens(4 * 64, seed=1)
    opts = dict(method="svd-llm", ratio=0.4, calib=calib, calib_samples=4, calib_seqlen=64, progress=False)
    shapes = svdkit.find_architecture(tiny_model("llama")).shapes()
    aligned = svdkit.compress(tiny_model("llama"), rank_multiple=16, **opts)
    exact = svdkit.compress(tiny_model("llama"), rank_multiple=1, **opts)
    assert exact.ranks == {n: k for n, k in allocate_uniform(shapes, 0.4).items() if k is not None}
    assert aligned.ranks == align_ranks(exact.ranks, shapes, 16) != exact.ranks
    assert aligned.allocation["rank_multiple"] == 16 and exact.allocation["rank_multiple"] == 1
    assert aligned.params <= exact.params


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


def test_kv_ratio_ranks_stay_exact_and_the_rest_is_aligned_on_its_own_budget():
    calib = random_tokens(4 * 64, seed=1)
    opts = dict(method="svd-llm", ratio=0.4, calib=calib, calib_samples=4, calib_seqlen=64, progress=False)
    shapes = svdkit.find_architecture(tiny_model("llama")).shapes()
    r = svdkit.compress(tiny_model("llama"), kv_ratio=0.3, **opts)
    kv = {n: k for n, k in r.ranks.items() if n.endswith(("k_proj", "v_proj"))}
    assert set(kv.values()) == {22}  # floor(0.7 * 32): the cache's size, not rounded
    rest = {n: k for n, k in allocate_uniform(shapes, 0.4).items() if n not in kv}
    assert {n: k for n, k in r.ranks.items() if n not in kv} == align_ranks(rest, shapes, 8)


def test_info_names_the_rank_multiple(capsys, tmp_path, tiny_folder, text_file):
    out = tmp_path / "small"
    args = ["compress", str(tiny_folder), "--calib", str(text_file), "--calib-samples", "2", "--calib-seqlen", "32"]
    assert main([*args, "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "allocation uniform (ranks in multiples of 8)" in capsys.readouterr().out


def test_soco_final_ranks_are_aligned_within_the_budget():
    calib = random_tokens(8 * 64, seed=1)
    opts = dict(calib=calib, calib_samples=8, calib_seqlen=64, device="cpu", progress=False, ratio=0.4)
    shapes = svdkit.find_architecture(tiny_model("llama")).shapes()
    options = {"steps": 6, "seqlen": 32}
    r = svdkit.compress(tiny_model("llama"), method="soco", method_options=options, rank_multiple=4, **opts)
    assert all(k % 4 == 0 for k in r.ranks.values())
    budget = _cost(allocate_uniform(shapes, 0.4), shapes)
    assert r.training["budget"] == budget and r.training["kept"] == _cost(r.ranks, shapes) <= budget
    assert budget - r.training["kept"] < 4 * max(m + n for m, n in shapes.values())


def test_cli_rank_multiple_zero_exits_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "smollm2-135m", "--rank-multiple", "0", "--output", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "--rank-multiple: expected a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
