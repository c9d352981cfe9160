"""The thin SVD of a whitened weight, torch.linalg.svd against :func:`svdkit.methods.linalg.gram_svd`.

    python benchmarks/gram_svd.py [--shapes 2048x8192 8192x2048] [--samples 2048] [--ratio 0.4]

For each shape m x n: W random normal, G = X^T X / samples + 1e-3 I with X correlated inputs, M = W L
(L the Cholesky factor of G), all float64; times one ``torch.linalg.svd(M)`` and one ``gram_svd(M)``, and
prints the largest relative difference of the k singular values the ratio keeps. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

from svdkit.core.ranks import rank_for_ratio
from svdkit.methods.linalg import gram_svd


def whitened(m: int, n: int, samples: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(m, n, dtype=torch.float64, generator=g)
    mix = torch.randn(n, n, dtype=torch.float64, generator=g) * 0.05 + torch.eye(n, dtype=torch.float64)
    X = torch.randn(samples, n, dtype=torch.float64, generator=g) @ mix
    G = X.T @ X / samples + 1e-3 * torch.eye(n, dtype=torch.float64)
    return W @ torch.linalg.cholesky(G)


def timed(fn, M):
    start = time.perf_counter()
    out = fn(M)
    return time.perf_counter() - start, out[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["2048x8192", "8192x2048"], help="m x n (2048x8192 8192x2048)")
    p.add_argument("--samples", type=int, default=2048, help="calibration samples behind G (2048)")
    p.add_argument("--ratio", type=float, default=0.4, help="the ratio whose kept singular values are compared")
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| shape | torch.linalg.svd s | gram_svd s | speed-up | kept k | largest relative difference of S_1..S_k |")
    print("|---|---|---|---|---|---|")
    for shape in a.shapes:
        m, n = (int(v) for v in shape.split("x"))
        M = whitened(m, n, a.samples)
        t_svd, S = timed(lambda x: torch.linalg.svd(x, full_matrices=False), M)
        t_gram, S_gram = timed(gram_svd, M)
        k = rank_for_ratio(m, n, a.ratio)
        diff = float(((S_gram[:k] - S[:k]) / S[:k]).abs().max())
        print(f"| {m} x {n} | {t_svd:.1f} | {t_gram:.1f} | {t_svd / t_gram:.1f}x | {k} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
