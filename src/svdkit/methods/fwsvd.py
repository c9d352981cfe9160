"""FWSVD: Fisher-weighted SVD (Hsu et al. 2022, arXiv 2207.00112).

The Fisher information of a weight, F_ij = mean over calibration windows of (dL/dW_ij)^2 for the
next-token loss L, says how much the loss cares about it. FWSVD sums it per output row,
I_i = sum_j F_ij, decomposes diag(sqrt(I)) W = U S V^T, keeps k and un-scales the left factor:
A = sqrt(S_k) V_k^T, B = diag(1/sqrt(I)) U_k sqrt(S_k). Rows with (near) zero importance are floored at
1e-6 * max(I) so the un-scaling stays finite. The gradients come from
:func:`svdkit.calibration.gradients.collect_fisher`, which backpropagates one decoder layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration.statistics import LinearStats
from ..core.options import Options
from .base import Factors, register
from .linalg import floor_relative, scaled_svd_factors

__all__ = ["FWSVDConfig", "fwsvd"]


@dataclass
class FWSVDConfig(Options):
    """FWSVD has no options (the Fisher information comes from the calibration windows)."""


@register(
    "fwsvd",
    FWSVDConfig,
    requires=("fisher",),
    summary="Fisher-weighted SVD: SVD of diag(sqrt(row Fisher)) W (needs a gradient pass)",
    paper="Hsu et al. 2022, FWSVD, arXiv 2207.00112",
    nested=True,
)
def fwsvd(W: torch.Tensor, stats: LinearStats | None, rank: int, config: FWSVDConfig) -> Factors:
    """B = diag(1/sqrt(I)) U_k sqrt(S_k), A = sqrt(S_k) V_k^T from SVD(diag(sqrt(I)) W)."""
    if stats is None:
        raise ValueError("fwsvd needs the Fisher information of the layer's weight")
    importance = stats["fisher"].to(W)
    if importance.shape != (W.shape[0],):
        raise ValueError(f"fisher statistic has shape {tuple(importance.shape)}, expected ({W.shape[0]},)")
    if not bool((importance > 0).any()):
        return scaled_svd_factors(W, rank)  # no gradient reached this matrix: nothing to weight by
    return scaled_svd_factors(W, rank, left=floor_relative(importance, 1e-6).sqrt())
