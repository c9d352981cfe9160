"""SVD-LLM: truncation-aware data whitening (Wang et al. 2024, arXiv 2403.07378).

With the input Gram matrix G = X X^T = L L^T (Cholesky), SVD(W L) = U S V^T and
A = sqrt(S_k) V_k^T L^-1, B = U_k sqrt(S_k). Then ||(W - B A) X||_F = sqrt(sum_{i>k} S_i^2):
every dropped singular value maps directly to output error. A Gram matrix that is not positive
definite gets the reference's jitter (|lambda_min| + eps) I, eps relative (see robust_cholesky).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration.statistics import LinearStats
from ..core.options import Options, number, option
from .base import Factors, register
from .linalg import gram_svd, robust_cholesky, split_factors

__all__ = ["SVDLLMConfig", "svd_llm", "whitened_spectrum"]


@dataclass
class SVDLLMConfig(Options):
    rel_eps: float = option(
        1e-6, "jitter added to a non-positive-definite Gram matrix, relative to its largest eigenvalue", number(0, 1)
    )


def whitened_spectrum(W: torch.Tensor, G: torch.Tensor, rel_eps: float = 1e-6):
    """(U, S, Vh, L) with W L = U diag(S) Vh (by :func:`gram_svd`) and L L^T = G (+ jitter)."""
    L, _ = robust_cholesky(G.to(W), rel_eps)
    U, S, Vh = gram_svd(W @ L)
    return U, S, Vh, L


@register(
    "svd-llm",
    SVDLLMConfig,
    requires=("gram",),
    summary="truncation-aware whitening: SVD of W L with G = L L^T (Cholesky)",
    paper="Wang et al. 2024, SVD-LLM, arXiv 2403.07378",
    nested=True,
)
def svd_llm(W: torch.Tensor, stats: LinearStats | None, rank: int, config: SVDLLMConfig) -> Factors:
    """A = sqrt(S_k) V_k^T L^-1, B = U_k sqrt(S_k) from SVD(W L)."""
    if stats is None:
        raise ValueError("svd-llm needs the Gram matrix of the layer's calibration inputs")
    U, S, Vh, L = whitened_spectrum(W, stats.gram_mean, config.rel_eps)
    A, B = split_factors(U, S, Vh, rank)
    # A L^-1: solve Z L = A for Z (L lower triangular), no explicit inverse.
    A = torch.linalg.solve_triangular(L, A, upper=False, left=False)
    return A, B
