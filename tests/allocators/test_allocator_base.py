"""The allocator registry inside compress(): an unknown allocation lists the known ones; bad combinations."""

from __future__ import annotations

import pytest
from conftest import random_tokens, tiny_model

import svdkit
from svdkit import LowRankLinear, SvdkitError


def test_allocation_errors():
    model = tiny_model("llama")
    calib = random_tokens(4 * 32, seed=1)
    kw = dict(calib=calib, calib_samples=4, calib_seqlen=32, device="cpu", progress=False)
    with pytest.raises(SvdkitError, match="unknown allocation 'magic'; known: bytes, sensitivity, uniform, v2$"):
        svdkit.compress(model, method="asvd", allocation="magic", **kw)
    with pytest.raises(SvdkitError, match="sequential mode"):
        svdkit.compress(model, method="fwsvd", sequential=True, **kw)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
