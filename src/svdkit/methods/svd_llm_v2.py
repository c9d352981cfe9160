"""SVD-LLM V2: loss-optimized truncation (Wang et al. 2025, arXiv 2503.12340).

Eigendecompose the input Gram matrix G = U_s Lambda U_s^T, form D = W U_s sqrt(Lambda), take
SVD(D) = U_w S_w V_w^T, truncate to k and project back:
W' = U_w,k S_w,k V_w,k^T sqrt(Lambda)^-1 U_s^T, stored as A = sqrt(S_k) V_k^T sqrt(Lambda)^-1 U_s^T,
B = U_k sqrt(S_k). The output error ||(W - W') X||_F^2 is exactly the sum of the dropped S_w^2, the
minimum over rank-k matrices, and no positive-definiteness is needed: on a full-rank G this is
SVD-LLM's result (W L and D differ by an orthogonal factor), without Cholesky or jitter.

Tiny and zero eigenvalues (svdkit's choice; the paper is silent): eigenvalues at or below
``rel_floor * lambda_max`` (default 1e-10; slightly negative ones from rounding included) are
directions the calibration inputs do not reach. They carry under 1e-10 of the input energy, so the
calibration loss cannot see what W' does there; dividing by their sqrt would only amplify rounding.
They are dropped from D and from the back-projection (a pseudo-inverse), which bounds the amplification
of float64 rounding in V_w by 1 / sqrt(rel_floor) = 1e5. When the inputs reach only r < k directions,
the spare k - r ranks keep the plain SVD of the residual W - W' (what W does on the unreached
directions), so no rank is wasted and W' is never worse than W on inputs outside the calibration span.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration.statistics import LinearStats
from ..core.options import Options, number, option
from .base import Factors, register
from .linalg import eigen_whitened_factors, nested_factors

__all__ = ["SVDLLMV2Config", "svd_llm_v2"]


@dataclass
class SVDLLMV2Config(Options):
    rel_floor: float = option(
        1e-10,
        "eigenvalues of G at or below rel_floor * lambda_max are treated as unreached directions",
        number(0, 1, hi_open=True),
    )


@register(
    "svd-llm-v2",
    SVDLLMV2Config,
    requires=("gram",),
    summary="loss-optimized truncation: SVD of W U sqrt(Lambda) from G = U Lambda U^T (no Cholesky)",
    paper="Wang et al. 2025, SVD-LLM V2, arXiv 2503.12340",
    nested=True,
)
def svd_llm_v2(W: torch.Tensor, stats: LinearStats | None, rank: int, config: SVDLLMV2Config) -> Factors:
    """A = sqrt(S_k) V_k^T sqrt(Lambda)^+ U_s^T, B = U_k sqrt(S_k) from SVD(W U_s sqrt(Lambda))."""
    if stats is None:
        raise ValueError("svd-llm-v2 needs the Gram matrix of the layer's calibration inputs")
    A, B, _ = eigen_whitened_factors(W, stats.gram_mean.to(W), rank, config.rel_floor)
    return nested_factors(W, (A, B), rank - A.shape[0])
