"""FWSVD on a small matrix: rows weighted by their Fisher importance."""

from __future__ import annotations

import pytest
import torch
from conftest import W, product, truncated

from svdkit.calibration.statistics import LinearStats

pytestmark = pytest.mark.usefixtures("float64_default")


def test_fwsvd_weights_rows_by_fisher_importance():
    g = torch.Generator().manual_seed(2)
    importance = torch.rand(12, generator=g) * 10 + 0.1
    stats = LinearStats({"fisher": importance}, tokens=1)
    W_ = product("fwsvd", W, stats, 4)
    r = importance.sqrt()[:, None]
    assert torch.allclose(r * W_, truncated(r * W, 4), atol=1e-10)
    # uniform importance is plain SVD; a zero row weight stays finite
    uniform = LinearStats({"fisher": torch.full((12,), 3.0)}, tokens=1)
    assert torch.allclose(product("fwsvd", W, uniform, 4), product("svd", W, None, 4), atol=1e-10)
    importance[5] = 0.0
    assert torch.isfinite(product("fwsvd", W, LinearStats({"fisher": importance}, tokens=1), 4)).all()
