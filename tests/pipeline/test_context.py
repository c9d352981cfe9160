"""Windows longer than the model's context (max_position_embeddings, 256 for the tiny models) are refused
by the plan, before any calibration: from Python, from a replan and from the command line (exit 2, one
line, nothing written). A model that declares no context is not checked."""

from __future__ import annotations

import dataclasses
import re

import pytest
from conftest import assert_error, compress_small, random_tokens, run_cli, tiny_model

import svdkit
from svdkit.core.lowrank import LowRankLinear
from svdkit.pipeline.options import CalibrationSettings, CompressionOptions
from svdkit.pipeline.plan import make_plan, replan

BEYOND = (
    "calibration windows of 257 tokens are longer than the model's context of 256 tokens "
    "(max_position_embeddings): pass --calib-seqlen / calib_seqlen of at most 256"
)


def _options(seqlen: int, **kw) -> CompressionOptions:
    calibration = CalibrationSettings(random_tokens(4 * 300, seed=1), samples=4, seqlen=seqlen)
    return CompressionOptions(**{"device": "cpu", "progress": False, "calibration": calibration, **kw})


@pytest.mark.parametrize("method", ["svd-llm", "soco"])
def test_calibration_beyond_the_context_is_refused_before_any_work(method):
    model = tiny_model()
    with pytest.raises(svdkit.SvdkitError, match=f"^{re.escape(BEYOND)}$"):
        make_plan(model, _options(257, method=method))
    with pytest.raises(svdkit.SvdkitError, match="longer than the model's context of 256 tokens"):
        compress_small(model, method=method, calib=random_tokens(4 * 300, seed=1), calib_seqlen=257)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    make_plan(model, _options(256, method=method))  # the context itself is fine


def test_replan_checks_the_context_too():
    model = tiny_model()
    plan = make_plan(model, _options(64))
    longer = dataclasses.replace(plan.options.calibration, seqlen=257)
    with pytest.raises(svdkit.SvdkitError, match="longer than the model's context of 256 tokens"):
        replan(plan, calibration=longer)


def test_windows_that_are_not_read_and_models_without_a_context_are_not_checked():
    make_plan(tiny_model(), _options(257, method="svd"))  # plain SVD reads no calibration text
    model = tiny_model()
    object.__setattr__(model.config, "max_position_embeddings", None)  # past the config's own type check
    assert make_plan(model, _options(257)).facts.context is None


def test_cli_compress_beyond_the_context_exits_2_and_writes_nothing(capsys, tiny_folder, text_file, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(
        capsys, "compress", tiny_folder, "--calib", text_file, "--calib-seqlen", "257", "--output", out
    )
    assert_error(code, err, "longer than the model's context of 256 tokens")
    assert "--calib-seqlen" in err and not out.exists()
