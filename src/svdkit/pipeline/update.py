"""Parameter update after truncation: a closed-form least-squares refit of B (SVD-LLM, Wang et al. 2024,
arXiv 2403.07378, Section 3.3), usable with any method's pair.

With A fixed, minimise ||W X - B A X'||_F over B, where X are the inputs the dense layer sees and X'
those the compressed layer sees (X' = X unless calibration is sequential). Setting the gradient to
zero gives B M = W C A^T with M = A G' A^T (k x k), G' = X' X'^T and C = X X'^T. svdkit solves it as the
smallest change to the method's B: B = B0 + (W C A^T - B0 M) M^+, with the pseudo-inverse cut at
1e-12 of M's largest eigenvalue. On the span of M this is the least-squares solution; rows of A that
the inputs never reach (M's null space) keep the method's B0, so the refit cannot erase what a method
stored there (SVD-LLM V2's spare ranks, NSVD's residual stage).

Refitting B rather than A keeps the system k x k and well conditioned. When X' = X and A comes from
SVD-LLM's whitening, B0 is already this optimum (A G A^T = S_k and W G A^T = U_k S_k^{3/2}), so the
refit changes nothing: it helps methods whose B is not fitted to the data (svd, asvd, fwsvd, nsvd),
and SVD-LLM once X' differs from X (sequential calibration).

The sequential form needs intra-layer sequential statistics (:func:`svdkit.calibration.collect.calibrate_layers`
stages every layer by distinct input): when o_proj and down_proj were fitted on inputs computed with
the dense q/k/v and gate/up, they corrected the upstream error a second time on top of the refitted
q/k/v and gate/up, and the model collapsed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..calibration.collect import CROSS
from ..calibration.statistics import LinearStats

__all__ = ["UPDATES", "Update", "lstsq_update"]


@dataclass(frozen=True)
class Update:
    """A refit of a method's factors on the calibration statistics, after the method: the new B of (A, B)."""

    name: str
    refit: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, LinearStats], torch.Tensor]
    """(W, A, B, statistics) -> B, all float64"""
    requires: frozenset[str]
    """the statistics it reads"""
    sequential_requires: frozenset[str] = frozenset()
    """the statistics it reads on top when calibration is sequential"""


def _lstsq(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, stats: LinearStats) -> torch.Tensor:
    cross = stats[CROSS].to(W) if CROSS in stats else None
    return lstsq_update(W, A, B, stats.gram_mean.to(W), cross)


UPDATES: dict[str, Update | None] = {
    "none": None,
    "lstsq": Update("lstsq", _lstsq, frozenset({"gram"}), frozenset({CROSS})),
}
"""the updates by name; ``none`` keeps the method's factors"""


def lstsq_update(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor | None = None
) -> torch.Tensor:
    """The refit B for y = W x (all float64): gram = G' = X' X'^T / T, cross = C = X X'^T / T (default G')."""
    C = gram if cross is None else cross
    M = A @ gram @ A.T
    M = (M + M.T) / 2
    evals, vecs = torch.linalg.eigh(M)
    keep = evals > 1e-12 * max(float(evals[-1]), 0.0)
    if not bool(keep.any()):
        return B
    V, lam = vecs[:, keep], evals[keep]
    residual = W @ C @ A.T - B @ M
    return B + ((residual @ V) / lam[None, :]) @ V.T
