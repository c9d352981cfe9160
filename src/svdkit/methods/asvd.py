"""ASVD: activation-aware SVD (Yuan et al. 2023, arXiv 2312.05821).

Input channels that carry large activations matter more. With a_j = mean over tokens of |x_j| and
s_j = a_j^alpha, decompose W diag(s) = U S V^T exactly (the reference uses a randomized SVD), keep k,
and undo the scaling: A = sqrt(S_k) V_k^T diag(1/s), B = U_k sqrt(S_k). alpha = 0 is plain SVD.
Channels that never fire (a_j = 0) would make 1/s infinite: a_j is floored at 1e-6 * max(a) (the
reference adds 1e-6 to s), which leaves such channels nearly unconstrained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration.statistics import LinearStats
from ..core.options import Options, number, option
from .base import Factors, register
from .linalg import floor_relative, scaled_svd_factors

__all__ = ["ASVDConfig", "asvd"]


@dataclass
class ASVDConfig(Options):
    alpha: float = option(
        0.5, "exponent of the channel scale s_j = mean|x_j|^alpha, in [0, 2] (0 is plain SVD)", number(0, 2)
    )


@register(
    "asvd",
    ASVDConfig,
    requires=("mean_abs",),
    summary="activation-aware SVD: SVD of W diag(mean|x|^alpha), scaling undone",
    paper="Yuan et al. 2023, ASVD, arXiv 2312.05821",
    nested=True,
)
def asvd(W: torch.Tensor, stats: LinearStats | None, rank: int, config: ASVDConfig) -> Factors:
    """A = sqrt(S_k) V_k^T diag(1/s), B = U_k sqrt(S_k) from SVD(W diag(s)), s = mean|x|^alpha."""
    if stats is None:
        raise ValueError("asvd needs the mean absolute activation of the layer's inputs")
    if config.alpha == 0:
        return scaled_svd_factors(W, rank)
    scale = floor_relative(stats.mean_abs.to(W), 1e-6).pow(config.alpha)
    return scaled_svd_factors(W, rank, right=scale)
