"""The contract every allocator meets on tiny models: a rank (or None: kept dense) for exactly the given
targets, exact ranks that save parameters, the parameter budget of the ratio met, deterministic, and
the model left as it was. Alignment and fixed ranks are the pipeline's job, not the allocator's. (An allocator
that spends bytes on a stored base's corrections has its own tests: test_bytes_allocation.py.)"""

from __future__ import annotations

import pytest
import torch
from conftest import random_tokens, tiny_model

from svdkit.allocators import ALLOCATORS
from svdkit.calibration.store import StatisticsStore
from svdkit.core.ranks import cost, saves_parameters
from svdkit.pipeline.options import CalibrationSettings, CompressionOptions
from svdkit.pipeline.plan import make_plan
from svdkit.pipeline.stages import allocate, calibrate, read_windows, summarize

KINDS = ["llama", "llama-bias", "qwen2", "mistral", "gemma", "gemma3", "qwen3-sliding"]
OPTIONS = {"sensitivity": {"windows": 1, "seqlen": 16}, "v2": {}, "uniform": {}}
RATIO = 0.4


def allocation_of(kind: str, name: str, tmp_path):
    model = tiny_model(kind)
    options = dict(OPTIONS[name])
    if name == "sensitivity":
        options["cache"] = str(tmp_path / "table.json")
    calibration = CalibrationSettings(random_tokens(4 * 32, seed=1), samples=4, seqlen=32)
    plan = make_plan(
        model,
        CompressionOptions(
            method="svd-llm",
            ratio=RATIO,
            allocation=name,
            allocation_options=options,
            rank_multiple=1,
            device="cpu",
            progress=False,
            calibration=calibration,
        ),
    )
    windows = read_windows(plan)
    statistics = calibrate(plan, model, windows)
    summaries = summarize(plan, model, statistics, windows)
    return model, plan, statistics, allocate(plan, model, statistics, windows, summaries)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", [n for n in ALLOCATORS.names() if not ALLOCATORS.get(n).corrects_base])
def test_allocator_contract(kind, name, tmp_path):
    model, plan, statistics, allocation = allocation_of(kind, name, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        ranks = plan.allocator.allocate(allocation.context, plan.options.resolved.allocation_config)
    finally:
        if isinstance(statistics, StatisticsStore):
            statistics.close()
    shapes = plan.shapes
    assert list(ranks) == list(shapes) or set(ranks) == set(shapes)
    assert ranks == allocation.budget  # deterministic, and the pipeline kept it as it was (no multiple, no k/v)
    for target, k in ranks.items():
        m, n = shapes[target]
        assert k is None or (isinstance(k, int) and 1 <= k <= min(m, n) and saves_parameters(m, n, k)), (target, k)
    dense = sum(m * n for m, n in shapes.values())
    spent = sum(cost(shapes[t], k) for t, k in ranks.items())
    assert spent <= (1 - RATIO) * dense * (1 + 1e-9)  # the budget is met ...
    assert spent > (1 - RATIO) * dense * 0.75  # ... and spent, not thrown away
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is untouched
