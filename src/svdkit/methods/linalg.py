"""Float64 building blocks shared by the methods: sqrt-split factors and a Cholesky that never fails."""

from __future__ import annotations

import torch

__all__ = ["split_factors", "robust_cholesky"]


def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k factors of U diag(S) Vh with sqrt(S) split into both: A = sqrt(S_k) Vh_k, B = U_k sqrt(S_k)."""
    root = S[:k].clamp_min(0).sqrt()
    return root[:, None] * Vh[:k], U[:, :k] * root[None, :]


def robust_cholesky(G: torch.Tensor, rel_eps: float = 1e-6, tries: int = 8) -> tuple[torch.Tensor, float]:
    """Lower-triangular L with L L^T = G + jitter I; returns (L, jitter).

    SVD-LLM's reference adds (|lambda_min| + eps) I when G is not positive definite; here eps is
    relative to the largest eigenvalue (so the floor is scale-free), and it grows tenfold per retry.
    """
    G = (G + G.T) / 2
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0 and bool(torch.isfinite(L).all()):
        return L, 0.0
    evals = torch.linalg.eigvalsh(G)
    scale = float(evals[-1].abs().clamp_min(torch.finfo(G.dtype).tiny))
    jitter = float(max(-evals[0], 0.0)) + rel_eps * scale
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    for _ in range(tries):
        L, info = torch.linalg.cholesky_ex(G + jitter * eye)
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            return L, jitter
        jitter *= 10
    raise RuntimeError(f"Cholesky failed even with jitter {jitter:.3g}")
