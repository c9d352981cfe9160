"""NSVD: nested activation-aware decomposition (Lu et al. 2025, arXiv 2503.17101).

The rank k is split into k1 = round(f k) (f = 0.95 by default) and k2 = k - k1. A first,
activation-aware stage fits W on the calibration inputs at rank k1:
- NSVD-I (``nsvd``): Cholesky whitening as in SVD-LLM, SVD(W L), G = L L^T.
- NSVD-II (``nsvd2``): the eigen route, SVD(W S) with S = U_s sqrt(Lambda) from G = U_s Lambda U_s^T
  (equivalently the SVD of the activations X = U_s sqrt(Lambda) V^T), pseudo-inverse on the directions
  the inputs never reach (see :func:`~svdkit.methods.linalg.eigen_whitening`).
A second stage keeps the plain SVD of the residual W - W1 at rank k2: it restores the part of W that
the calibration data did not weight, which is what makes NSVD robust to inputs unlike the calibration
text (other domains). The pair is stored as one rank-k pair: A = [A1; A2], B = [B1, B2], so
W' = B A = W1 + R_k2. With f = 1 this is the first stage alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..statistics import LinearStats
from .linalg import eigen_whitened_factors, split_factors
from .registry import Factors, register
from .svd_llm import SVDLLMConfig, svd_llm

__all__ = ["NSVDConfig", "NSVD2Config", "nsvd", "nsvd2", "nested_factors", "stage_ranks"]


def _check_fraction(f) -> None:
    if isinstance(f, bool) or not isinstance(f, int | float) or not math.isfinite(f) or not 0 < f <= 1:
        raise ValueError(f"k1_fraction must be a number in (0, 1], got {f!r}")


@dataclass
class NSVDConfig:
    k1_fraction: float = 0.95
    """share of the rank given to the activation-aware first stage, in (0, 1]"""
    rel_eps: float = 1e-6
    """Cholesky jitter relative to the largest eigenvalue, for a Gram matrix that is not positive definite"""

    def __post_init__(self) -> None:
        _check_fraction(self.k1_fraction)


@dataclass
class NSVD2Config:
    k1_fraction: float = 0.95
    """share of the rank given to the activation-aware first stage, in (0, 1]"""
    rel_floor: float = 1e-10
    """eigenvalues of G below rel_floor * lambda_max are treated as unreached directions"""

    def __post_init__(self) -> None:
        _check_fraction(self.k1_fraction)


def stage_ranks(rank: int, fraction: float) -> tuple[int, int]:
    """(k1, k2) with k1 = round(fraction * rank) clamped to [1, rank] and k2 = rank - k1.

    Python rounds halves to even, as the paper's round() is read here; with the default 0.95 any rank
    of 10 or less therefore has no residual stage (k2 = 0): NSVD is then its first stage alone.
    """
    k1 = min(rank, max(1, round(fraction * rank)))
    return k1, rank - k1


def nested_factors(W: torch.Tensor, first: Factors, k2: int) -> Factors:
    """Append the rank-k2 plain SVD of the residual W - B1 A1 to the first-stage pair (A1, B1)."""
    A1, B1 = first
    if k2 == 0:
        return A1, B1
    U, S, Vh = torch.linalg.svd(W - B1 @ A1, full_matrices=False)
    A2, B2 = split_factors(U, S, Vh, k2)
    return torch.cat([A1, A2], 0), torch.cat([B1, B2], 1)


def _gram(stats: LinearStats | None, name: str, W: torch.Tensor) -> torch.Tensor:
    if stats is None:
        raise ValueError(f"{name} needs the Gram matrix of the layer's calibration inputs")
    return stats.gram_mean.to(W)


@register(
    "nsvd",
    NSVDConfig,
    requires=("gram",),
    summary="NSVD-I: Cholesky-whitened SVD at rank 0.95k + plain SVD of the residual",
    paper="Lu et al. 2025, NSVD, arXiv 2503.17101",
)
def nsvd(W: torch.Tensor, stats: LinearStats | None, rank: int, config: NSVDConfig) -> Factors:
    """First stage SVD-LLM at rank k1 (A1 = sqrt(S) V^T L^-1), then the residual's SVD at rank k - k1."""
    k1, k2 = stage_ranks(rank, config.k1_fraction)
    _gram(stats, "nsvd", W)
    return nested_factors(W, svd_llm(W, stats, k1, SVDLLMConfig(config.rel_eps)), k2)


@register(
    "nsvd2",
    NSVD2Config,
    requires=("gram",),
    summary="NSVD-II: eigen-whitened SVD at rank 0.95k + plain SVD of the residual",
    paper="Lu et al. 2025, NSVD, arXiv 2503.17101",
)
def nsvd2(W: torch.Tensor, stats: LinearStats | None, rank: int, config: NSVD2Config) -> Factors:
    """First stage SVD(W S), S S^T = G by eigendecomposition (A1 = sqrt(S) V^T S^+), then the residual."""
    k1, k2 = stage_ranks(rank, config.k1_fraction)
    A1, B1, _ = eigen_whitened_factors(W, _gram(stats, "nsvd2", W), k1, config.rel_floor)
    if A1.shape[0] < k1:  # the inputs span fewer than k1 directions: the residual stage takes the rest
        k2 += k1 - A1.shape[0]
    return nested_factors(W, (A1, B1), k2)
