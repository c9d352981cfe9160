"""Float64 building blocks shared by the methods: sqrt-split factors, diagonal scalings, and two
whitenings of a Gram matrix (a Cholesky that never fails, and an eigen route with a pseudo-inverse), and
the nested pair (a first stage plus the plain SVD of its residual) that NSVD and SVD-LLM V2 store."""

from __future__ import annotations

import torch

from ..calibration.statistics import all_finite

__all__ = [
    "gram_svd",
    "split_factors",
    "robust_cholesky",
    "scaled_svd_factors",
    "eigen_whitening",
    "eigen_whitened_factors",
    "whitened_singular_values",
    "floor_relative",
    "nested_factors",
    "split_rank",
]


def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k factors of U diag(S) Vh with sqrt(S) split into both: A = sqrt(S_k) Vh_k, B = U_k sqrt(S_k)."""
    root = S[:k].clamp_min(0).sqrt()
    return root[:, None] * Vh[:k], U[:, :k] * root[None, :]


def gram_svd(M: torch.Tensor, rel_cut: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD M = U diag(S) Vh (S descending) from the eigendecomposition of the smaller Gram matrix.

    With m <= n, M M^T = U diag(S^2) U^T and Vh = diag(1/S) U^T M; otherwise the same from M^T M. It costs a
    product and an eigendecomposition of min(m, n)^2 instead of an SVD (several times faster for wide or tall
    matrices, docs/scale.md). Squaring the spectrum leaves a singular value accurate to about sqrt(eps) S_1
    only, so the other side's vectors of S_i <= rel_cut * S_1 are set to zero (their products are noise).
    """
    wide = M.shape[0] <= M.shape[1]
    evals, vecs = torch.linalg.eigh(M @ M.T if wide else M.T @ M)
    S = evals.flip(0).clamp_min(0).sqrt()
    vecs = vecs.flip(1)
    inverse = torch.where(S > rel_cut * S[:1].clamp_min(torch.finfo(S.dtype).tiny), 1 / S, torch.zeros_like(S))
    if wide:
        return vecs, S, (vecs.T @ M) * inverse[:, None]
    return (M @ vecs) * inverse[None, :], S, vecs.T


def floor_relative(v: torch.Tensor, rel: float) -> torch.Tensor:
    """Clamp a non-negative vector from below at rel * max(v), so 1 / v stays finite and bounded."""
    top = float(v.max()) if v.numel() else 0.0
    return v.clamp_min(max(rel * top, torch.finfo(v.dtype).tiny))


def scaled_svd_factors(
    W: torch.Tensor, k: int, left: torch.Tensor | None = None, right: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-k factors of W from the exact SVD of diag(left) W diag(right), with the scalings undone.

    diag(l) W diag(r) = U S V^T; A = sqrt(S_k) V_k^T diag(1/r), B = diag(1/l) U_k sqrt(S_k). The scales
    must be positive (callers floor them). With both scales None this is plain truncated SVD.
    """
    M = W
    if left is not None:
        M = left[:, None] * M
    if right is not None:
        M = M * right[None, :]
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    A, B = split_factors(U, S, Vh, k)
    if right is not None:
        A = A / right[None, :]
    if left is not None:
        B = B / left[:, None]
    return A, B


def robust_cholesky(G: torch.Tensor, rel_eps: float = 1e-6, tries: int = 8) -> tuple[torch.Tensor, float]:
    """Lower-triangular L with L L^T = G + jitter I; returns (L, jitter).

    SVD-LLM's reference adds (|lambda_min| + eps) I when G is not positive definite; here eps is
    relative to the largest eigenvalue (so the floor is scale-free), and it grows tenfold per retry.
    G must be symmetric (the calibration's Gram matrices are): only its lower triangle is read, and it
    is not copied (the jitter shifts its diagonal in place; G is restored exactly before returning).
    """
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0 and all_finite(L):
        return L, 0.0
    del L
    evals = torch.linalg.eigvalsh(G)
    scale = float(evals[-1].abs().clamp_min(torch.finfo(G.dtype).tiny))
    jitter = float(max(-evals[0], 0.0)) + rel_eps * scale
    diagonal = G.diagonal().clone()  # G + jitter I is G with its diagonal shifted, restored exactly after
    try:
        for _ in range(tries):
            G.diagonal().copy_(diagonal + jitter)
            L, info = torch.linalg.cholesky_ex(G)
            if int(info) == 0 and all_finite(L):
                return L, jitter
            del L
            jitter *= 10
    finally:
        G.diagonal().copy_(diagonal)
    raise RuntimeError(f"Cholesky failed even with jitter {jitter:.3g}")


def eigen_whitening(G: torch.Tensor, rel_floor: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S_pinv) with S = U_s sqrt(Lambda) from G = U_s Lambda U_s^T, so S S^T = G (up to the floor).

    No positive-definiteness is needed. Eigenvalues at or below rel_floor * lambda_max (including the
    slightly negative ones rounding produces) are directions the calibration inputs never reach: they
    are dropped from S and from its pseudo-inverse S_pinv = sqrt(Lambda)^+ U_s^T, so the weight is left
    unconstrained there rather than amplified by 1 / sqrt(tiny). S_pinv S is the r x r identity and
    S S_pinv = U_r U_r^T projects onto the reached subspace, so W S S_pinv X = W X for every X in it.
    Returns S (n x r) and S_pinv (r x n). G must be symmetric: only its lower triangle is read.
    """
    evals, vecs = torch.linalg.eigh(G)
    top = float(evals[-1]) if evals.numel() else 0.0
    keep = evals > rel_floor * max(top, 0.0)
    if not bool(keep.any()):
        raise ValueError("the Gram matrix is zero: no calibration input reached this layer")
    vecs, root = vecs[:, keep], evals[keep].sqrt()
    return vecs * root[None, :], (vecs / root[None, :]).T


def eigen_whitened_factors(
    W: torch.Tensor, G: torch.Tensor, k: int, rel_floor: float = 1e-10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD-LLM V2's loss-optimal rank-k factors of W under the input Gram matrix G: (A, B, S_D).

    D = W S with S S^T = G (:func:`eigen_whitening`); SVD(D) = U diag(S_D) V^T; A = sqrt(S_k) V_k^T S^+,
    B = U_k sqrt(S_k). Then ||(W - B A) X||_F^2 = sum_{i>k} S_D,i^2 (the minimum over all rank-k
    matrices). When the inputs reach only r < k directions, A and B have r rows / columns (the caller
    decides what the spare ranks hold). S_D (all singular values of D) is returned for the caller.
    """
    S_w, S_pinv = eigen_whitening(G, rel_floor)
    U, S, Vh = torch.linalg.svd(W @ S_w, full_matrices=False)
    A, B = split_factors(U, S, Vh, min(k, S.numel()))
    return A @ S_pinv, B, S


def whitened_singular_values(W: torch.Tensor, G: torch.Tensor, rel_floor: float = 1e-10) -> torch.Tensor:
    """Singular values of D = W S (S S^T = G), descending: dropping the i-th costs S_D,i^2 of output error
    ||(W - W') X||_F^2. The same for any square root of G, so SVD-LLM's W L has them too."""
    S_w, _ = eigen_whitening(G, rel_floor)
    return torch.linalg.svdvals(W @ S_w)


def split_rank(rank: int, fraction: float) -> tuple[int, int]:
    """(k1, k2) with k1 = round(fraction * rank) clamped to [1, rank] and k2 = rank - k1.

    Python rounds halves to even, as NSVD's round() is read here; with fraction 0.95 any rank of 10 or
    less therefore has no second stage (k2 = 0).
    """
    k1 = min(rank, max(1, round(fraction * rank)))
    return k1, rank - k1


def nested_factors(
    W: torch.Tensor, first: tuple[torch.Tensor, torch.Tensor], k2: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the rank-k2 plain SVD of the residual W - B1 A1 to the first-stage pair (A1, B1)."""
    A1, B1 = first
    if k2 == 0:
        return A1, B1
    U, S, Vh = torch.linalg.svd(W - B1 @ A1, full_matrices=False)
    A2, B2 = split_factors(U, S, Vh, k2)
    return torch.cat([A1, A2], 0), torch.cat([B1, B2], 1)
