"""SoCo's configuration: the start ranks and the option checks (its batch against the calibration windows when
planning)."""

from __future__ import annotations

import pytest
from conftest import random_tokens, tiny_model

import svdkit
from svdkit import rank_for_ratio
from svdkit.methods.soco import SoCoConfig, start_ranks
from svdkit.pipeline.options import CalibrationSettings, CompressionOptions
from svdkit.pipeline.plan import make_plan


def test_start_ranks_save_parameters():
    shapes = {"a": (64, 64), "b": (16, 64), "c": (10, 10)}
    ranks = start_ranks(shapes, SoCoConfig())
    assert ranks == {"a": 31, "b": 12, "c": 4}  # floor(m n / (m + n)) lowered while k (m + n) >= m n
    assert start_ranks(shapes, SoCoConfig(start_ratio=0.2))["a"] == rank_for_ratio(64, 64, 0.2)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"log": "/nonexistent-folder/curve.jsonl"}, "does not exist"),
        ({"base": "asvd"}, "needs statistics"),
        ({"base": "nope"}, "unknown base"),
        ({"coarse": 0.8, "refine": 0.5}, "sum <= 1"),
        ({"lr": 0}, "lr must be positive"),
        ({"lr": "fast"}, "lr must be a positive number, got 'fast'"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"steps": -1}, "steps must be"),
        ({"epochs": 0}, "epochs must be"),
        ({"held_out": 1}, "held_out must be"),
        ({"penalty_lr": 0}, "penalty_lr must be positive"),
        ({"anneal": "yes"}, "anneal must be true or false"),
        ({"loss": "mse"}, "loss must be 'ce' or 'kd'"),
    ],
)
def test_soco_config_errors(options, message):
    with pytest.raises(svdkit.SvdkitError, match=message):
        svdkit.methods.make_config(svdkit.get_method("soco"), options)


def test_a_batch_the_calibration_windows_cannot_fill_is_refused_when_planning():
    def plan(batch: int):
        calibration = CalibrationSettings(random_tokens(4 * 64, seed=1), samples=4, seqlen=64)
        options = CompressionOptions(
            method="soco", method_options={"seqlen": 32, "batch": batch}, device="cpu", calibration=calibration
        )
        return make_plan(tiny_model(), options)

    plan(6)  # 4 windows of 64, one held out, the other 3 cut into 6 of 32
    message = "method 'soco': batch=7 needs 7 training windows, but 4 calibration windows of 64 tokens give 6 of 32"
    with pytest.raises(svdkit.SvdkitError, match=message):
        plan(7)
