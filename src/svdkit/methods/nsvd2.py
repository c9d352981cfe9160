"""NSVD-II: NSVD's nested decomposition with an eigen-whitened first stage (Lu et al. 2025, arXiv 2503.17101).

As ``nsvd``, but the first stage whitens through the eigendecomposition G = U_s Lambda U_s^T: SVD(W S)
with S = U_s sqrt(Lambda) (equivalently the SVD of the activations X = U_s sqrt(Lambda) V^T), with a
pseudo-inverse on the directions the inputs never reach (see
:func:`~svdkit.methods.linalg.eigen_whitening`), so no positive-definiteness is needed. The second stage
keeps the plain SVD of the residual; when the inputs span fewer than k1 directions it takes the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration.statistics import LinearStats
from ..core.options import Options, number, option
from .base import Factors, register
from .linalg import eigen_whitened_factors, nested_factors, split_rank
from .nsvd import K1_FRACTION_HELP

__all__ = ["NSVD2Config", "nsvd2"]


@dataclass
class NSVD2Config(Options):
    k1_fraction: float = option(0.95, K1_FRACTION_HELP, number(0, 1, lo_open=True))
    rel_floor: float = option(
        1e-10, "eigenvalues of G below rel_floor * lambda_max are treated as unreached directions", number(0, 1)
    )


@register(
    "nsvd2",
    NSVD2Config,
    requires=("gram",),
    summary="NSVD-II: eigen-whitened SVD at rank 0.95k + plain SVD of the residual",
    paper="Lu et al. 2025, NSVD, arXiv 2503.17101",
)
def nsvd2(W: torch.Tensor, stats: LinearStats | None, rank: int, config: NSVD2Config) -> Factors:
    """First stage SVD(W S), S S^T = G by eigendecomposition (A1 = sqrt(S) V^T S^+), then the residual."""
    if stats is None:
        raise ValueError("nsvd2 needs the Gram matrix of the layer's calibration inputs")
    k1, k2 = split_rank(rank, config.k1_fraction)
    A1, B1, _ = eigen_whitened_factors(W, stats.gram_mean.to(W), k1, config.rel_floor)
    if A1.shape[0] < k1:  # the inputs span fewer than k1 directions: the residual stage takes the rest
        k2 += k1 - A1.shape[0]
    return nested_factors(W, (A1, B1), k2)
