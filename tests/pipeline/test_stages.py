"""The pipeline as a plan plus named stages: options checked without a model, one calibration mode per
plan, each stage callable on its own (and together equal to compress()), a plan replanned for another
ratio on an already factored model (what a sweep does)."""

from __future__ import annotations

import copy
import dataclasses
import inspect

import pytest
import torch
from conftest import random_tokens, tiny_model

import svdkit
from svdkit.calibration.collect import collect_statistics
from svdkit.core.lowrank import LowRankLinear
from svdkit.core.ranks import cost
from svdkit.pipeline.options import CalibrationSettings, CompressionOptions
from svdkit.pipeline.plan import CalibrationMode, make_plan, replan
from svdkit.pipeline.stages import allocate, calibrate, factor, read_windows, record, train

CALIB = CalibrationSettings(random_tokens(8 * 64, seed=1), samples=8, seqlen=64)


def options(**kw) -> CompressionOptions:
    return CompressionOptions(**{"device": "cpu", "progress": False, "calibration": CALIB, **kw})


@pytest.mark.parametrize(
    "kw, statistics, mode",
    [
        ({"method": "svd"}, False, CalibrationMode.NONE),
        ({"method": "svd-llm"}, False, CalibrationMode.LAYERWISE),
        ({"method": "svd-llm"}, True, CalibrationMode.PRECOMPUTED),
        ({"method": "fwsvd"}, False, CalibrationMode.COLLECT),
        ({"method": "svd-llm", "allocation": "v2"}, False, CalibrationMode.LAYERWISE),  # after a summary pass
        ({"method": "svd-llm", "allocation": "sensitivity"}, False, CalibrationMode.COLLECT),
        ({"method": "svd-llm", "sequential": True}, False, CalibrationMode.SEQUENTIAL),
        ({"method": "svd", "update": "lstsq", "sequential": True}, False, CalibrationMode.SEQUENTIAL),
    ],
)
def test_one_calibration_mode_per_plan(kw, statistics, mode):
    model = tiny_model()
    stats = None
    if statistics:
        windows = CALIB.source.reshape(8, 64)
        stats = collect_statistics(model, svdkit.find_architecture(model), windows, {"gram"}, torch.device("cpu"))
    plan = make_plan(model, options(**kw), stats)
    assert plan.mode is mode
    assert plan.layerwise == (mode in (CalibrationMode.LAYERWISE, CalibrationMode.SEQUENTIAL))
    assert ("cross" in plan.needs) == (kw.get("update") == "lstsq" and kw.get("sequential", False))


def test_options_are_checked_before_any_model():
    for kw, fragment in [
        ({"method": "nope"}, "unknown method 'nope'"),
        ({"method": "asvd", "method_options": {"alpha": 3}}, "alpha must be a number in"),
        ({"allocation": "v2", "kv_ratio": 0.5}, "use the uniform allocation with kv_ratio"),
        ({"ratio": 1.5}, "ratio must be strictly between 0 and 1"),
        ({"update": "magic"}, "unknown update 'magic'"),
        ({"rank_multiple": 0}, "rank_multiple must be a positive integer"),
    ]:
        with pytest.raises(svdkit.SvdkitError, match=fragment):
            options(**kw)
    resolved = options(method="nsvd", method_options={"k1_fraction": 0.9}, ratio=0, kv_ratio=0.5).resolved
    assert resolved.method.name == "nsvd" and resolved.method_config.k1_fraction == 0.9 and resolved.kv_only


def test_compress_takes_exactly_the_declared_options():
    """compress()'s keywords are CompressionOptions' fields (calib_* its CalibrationSettings), same defaults."""
    params = inspect.signature(svdkit.compress).parameters
    declared = {f.name: f.default for f in dataclasses.fields(CompressionOptions) if f.init and f.name != "calibration"}
    calibration = {f.name: f.default for f in dataclasses.fields(CalibrationSettings)}
    spelled = {"source": "calib", "samples": "calib_samples", "seqlen": "calib_seqlen", "offset": "calib_offset"}
    expected = {**declared, **{spelled.get(k, k): v for k, v in calibration.items()}}
    given = {k: p.default for k, p in params.items() if k not in ("model", "tokenizer", "statistics")}
    assert given == expected


def test_stages_one_by_one_give_what_compress_gives():
    model, reference = tiny_model(), tiny_model()
    plan = make_plan(model, options(method="svd-llm", ratio=0.4))
    windows = read_windows(plan)
    assert windows.shape == (8, 64)
    statistics = calibrate(plan, model, windows)
    assert statistics is None  # streaming: factor() calibrates layer by layer
    allocation = allocate(plan, model, statistics, windows)
    factored = factor(plan, model, allocation.ranks, statistics, windows)
    spent = factored.seconds
    assert spent["decomposition"] > 0 and spent["calibration"] > 0 and factored.healing == {}
    ranks, training = train(plan, model, allocation)
    assert ranks == allocation.ranks and training is None
    result = record(plan, model, allocation, ranks, training, spent, 0.0)
    expected = svdkit.compress(
        reference, method="svd-llm", ratio=0.4, calib=CALIB.source, calib_samples=8, calib_seqlen=64, progress=False
    )
    assert result.ranks == expected.ranks and result.params == expected.params
    assert model.config.svdkit.keys() == reference.config.svdkit.keys()
    state, expected_state = model.state_dict(), reference.state_dict()
    assert all(torch.equal(state[k], expected_state[k]) for k in expected_state)


def test_a_plan_replanned_for_another_ratio_trains_a_factored_copy():
    """A sweep factors once at SoCo's start ranks, then runs the train stage at several ratios on copies."""
    model = tiny_model()
    plan = make_plan(model, options(method="soco", ratio=0.4, rank_multiple=1, method_options={"steps": 4}))
    windows = read_windows(plan)
    start = allocate(plan, model, None, windows)
    factor(plan, model, start.ranks, None, windows)
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in plan.shapes)
    for ratio in (0.3, 0.5):
        work = copy.deepcopy(model)
        again = replan(plan, ratio=ratio, method_options={"steps": 3, "seqlen": 32})
        allocation = allocate(again, work, None, windows)  # finds the low-rank targets of the copy
        ranks, report = train(again, work, allocation)
        budget = sum(cost(again.shapes[n], k) for n, k in allocation.budget.items())
        assert report.facts["budget"] == budget and report.facts["kept"] <= budget and report.steps == 3
        assert ranks == {n: work.get_submodule(n).rank for n in plan.shapes}


def test_options_are_frozen_and_replan_keeps_the_targets():
    opts = options(method="svd-llm", ratio=0.4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.method = "svd"  # the record and the factors could disagree otherwise
    changed = dataclasses.replace(opts, method="asvd")
    assert changed.resolved.method.name == "asvd" and opts.resolved.method.name == "svd-llm"
    plan = make_plan(tiny_model(), opts)
    assert replan(plan, ratio=0.5).ratio == 0.5
    for change in ({"targets": ("k_proj",)}, {"ratio": 0, "kv_ratio": 0.5}):
        with pytest.raises(svdkit.SvdkitError, match="replan keeps the plan's targets"):
            replan(plan, **change)
