"""Plain truncated SVD, the baseline: W = U S V^T, keep the top k (Eckart-Young, no data)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration.statistics import LinearStats
from ..core.options import Options
from .base import Factors, register
from .linalg import split_factors

__all__ = ["SVDConfig", "svd"]


@dataclass
class SVDConfig(Options):
    """Plain SVD has no options."""


@register("svd", SVDConfig, requires=(), summary="plain truncated SVD of W (baseline, no calibration)", nested=True)
def svd(W: torch.Tensor, stats: LinearStats | None, rank: int, config: SVDConfig) -> Factors:
    """Best rank-k approximation of W in Frobenius norm; A = sqrt(S_k) V_k^T, B = U_k sqrt(S_k)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return split_factors(U, S, Vh, rank)
