"""NSVD-I: nested activation-aware decomposition (Lu et al. 2025, arXiv 2503.17101).

The rank k is split into k1 = round(f k) (f = 0.95 by default) and k2 = k - k1. A first,
activation-aware stage fits W on the calibration inputs at rank k1 with SVD-LLM's Cholesky whitening,
SVD(W L), G = L L^T. A second stage keeps the plain SVD of the residual W - W1 at rank k2: it restores
the part of W that the calibration data did not weight, which is what makes NSVD robust to inputs
unlike the calibration text (other domains). The pair is stored as one rank-k pair: A = [A1; A2],
B = [B1, B2], so W' = B A = W1 + R_k2. With f = 1 this is the first stage alone. NSVD-II (``nsvd2``)
whitens through the eigendecomposition instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration.statistics import LinearStats
from ..core.options import Options, number, option
from .base import Factors, register
from .linalg import nested_factors, split_rank
from .svd_llm import SVDLLMConfig, svd_llm

__all__ = ["NSVDConfig", "nsvd", "K1_FRACTION_HELP"]

K1_FRACTION_HELP = "share of the rank given to the activation-aware first stage, in (0, 1]"


@dataclass
class NSVDConfig(Options):
    k1_fraction: float = option(0.95, K1_FRACTION_HELP, number(0, 1, lo_open=True))
    rel_eps: float = option(
        1e-6,
        "Cholesky jitter relative to the largest eigenvalue, for a Gram matrix that is not positive definite",
        number(0, 1),
    )


@register(
    "nsvd",
    NSVDConfig,
    requires=("gram",),
    summary="NSVD-I: Cholesky-whitened SVD at rank 0.95k + plain SVD of the residual",
    paper="Lu et al. 2025, NSVD, arXiv 2503.17101",
)
def nsvd(W: torch.Tensor, stats: LinearStats | None, rank: int, config: NSVDConfig) -> Factors:
    """First stage SVD-LLM at rank k1 (A1 = sqrt(S) V^T L^-1), then the residual's SVD at rank k - k1."""
    if stats is None:
        raise ValueError("nsvd needs the Gram matrix of the layer's calibration inputs")
    k1, k2 = split_rank(rank, config.k1_fraction)
    return nested_factors(W, svd_llm(W, stats, k1, SVDLLMConfig(config.rel_eps)), k2)
