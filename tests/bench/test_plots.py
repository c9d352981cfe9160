"""The benchmark's plots: the plain and whitened singular-value spectra."""

from __future__ import annotations

import pytest
import torch

from svdkit.bench.plots import whitened_spectra
from svdkit.calibration.statistics import LinearStats


def test_whitened_spectrum_is_the_plain_one_under_identity_gram_and_tilts_otherwise():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False))
    eye = LinearStats({"gram": torch.eye(6, dtype=torch.float64) * 10}, 10, "0")
    plain, white = whitened_spectra(model, {"0": eye}, ["0"])["0"]
    assert plain == pytest.approx(white)
    # a Gram matrix that silences all but one input channel leaves one non-zero whitened component
    one = torch.zeros(6, 6, dtype=torch.float64)
    one[0, 0] = 5.0
    _, white = whitened_spectra(model, {"0": LinearStats({"gram": one}, 5, "0")}, ["0"])["0"]
    assert white[0] == 1.0 and max(white[1:]) < 1e-12
