"""SoCo's configuration: the start ranks and the option checks."""

from __future__ import annotations

import pytest

import svdkit
from svdkit import rank_for_ratio
from svdkit.methods.soco import SoCoConfig, start_ranks


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
        ({"steps": 0}, "steps must be a positive integer"),
        ({"penalty_lr": 0}, "penalty_lr must be positive"),
        ({"anneal": "yes"}, "anneal must be true or false"),
        ({"loss": "mse"}, "loss must be 'ce' or 'kd'"),
    ],
)
def test_soco_config_errors(options, message):
    with pytest.raises(svdkit.SvdkitError, match=message):
        svdkit.methods.make_config(svdkit.get_method("soco"), options)
