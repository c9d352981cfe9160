"""Block quantization of a weight matrix in the layout runtimes execute natively, and GPTQ from a Gram matrix.

W (m outputs x n inputs) is cut along its inputs into blocks of `block` columns; each row of a block gets one
scale s and integers q in [-2^(b-1), 2^(b-1) - 1] with W ~ s q: symmetric, the zero point 2^(b-1) implied,
exactly ONNX Runtime's MatMulNBits (and GatherBlockQuantized on uint8) convention, s = the block's value of
largest magnitude / -2^(b-1). :func:`pack` writes the codes as MatMulNBits stores them.

:func:`gptq` chooses the integers by GPTQ (Frantar et al. 2023, arXiv 2210.17323): with the inputs' Gram
matrix G = X X^T / T, the columns are quantized in order, and each one's rounding error e_j is spread over the
columns not yet quantized as W[:, k] -= e_j (H^-1)_jk / (H^-1)_jj, which minimizes ||(W - Q) X||_F column by
column (the OBS update); a block's scales are fixed from the updated weights when its first column is reached.
H^-1 is read from the upper Cholesky factor of the inverse of G + damp * mean(diag G) I.

:func:`quantized_low_rank` adds a rank-k correction to a quantized W, W ~ Q + B A (LQER, Zhang et al. ICML'24;
QERA, ICLR'25; EoRA): the B A that minimizes ||(W - Q - B A) X||_F is SVD-LLM's whitened truncation of the
residual W - Q (G = L L^T, SVD of (W - Q) L); further iterations quantize W - B A again and refit B A (the
alternation of CALDERA, Saha et al. NeurIPS'24), keeping the pair of smallest output error.
"""

from __future__ import annotations

import torch

from .linalg import robust_cholesky, split_factors
from .svd_llm import whitened_spectrum

__all__ = ["block_bytes", "dequantize", "gptq", "pack", "quantize", "quantized_low_rank", "round_to_nearest"]


def _limits(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _scales(W: torch.Tensor, bits: int) -> torch.Tensor:
    """One scale per row of a block (m x block): the entry of largest magnitude over -2^(b-1)."""
    top = W.gather(1, W.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    return top / _limits(bits)[0]


def _codes(W: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = _limits(bits)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.where(scale[:, None] == 0, 0, (W / safe[:, None]).round()).clamp(lo, hi)


def round_to_nearest(W: torch.Tensor, bits: int = 4, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes m x n, int8; scales m x ceil(n / block)) of W rounded to nearest, block by block."""
    codes, scales = [], []
    for start in range(0, W.shape[1], block):
        part = W[:, start : start + block]
        scale = _scales(part, bits)
        codes.append(_codes(part, scale, bits))
        scales.append(scale)
    return torch.cat(codes, 1).to(torch.int8), torch.stack(scales, 1)


def block_bytes(rows: int, cols: int, bits: int, block: int = 32) -> int:
    """Bytes of a rows x cols matrix stored as MatMulNBits stores it: `bits` per weight in blocks of `block`
    along each row (the last block padded), plus a float32 scale per block; 16 or 32 bits: plain floats."""
    if bits >= 16:
        return rows * cols * bits // 8
    return rows * -(-cols // block) * (block * bits // 8 + 4)


def quantize(
    W: torch.Tensor, G: torch.Tensor, bits: int, block: int, use_gptq: bool, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of W by GPTQ on the Gram matrix G or by rounding to nearest."""
    return gptq(W, G, bits, block, damp) if use_gptq else round_to_nearest(W, bits, block)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, block: int = 32) -> torch.Tensor:
    """s q, the matrix the codes stand for (in the scales' dtype)."""
    return codes.to(scales.dtype) * scales.repeat_interleave(block, dim=1)[:, : codes.shape[1]]


def _inverse_factor(G: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (G + damp mean(diag G) I)^-1 (U^T U = H^-1), dead inputs made harmless;
    by :func:`robust_cholesky`, so a Gram matrix that is not positive definite never fails."""
    H = G.clone()
    dead = H.diagonal() <= 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * float(H.diagonal().mean()))
    L, _ = robust_cholesky(H)
    return robust_cholesky(torch.cholesky_inverse(L))[0].T


def gptq(
    W: torch.Tensor, G: torch.Tensor, bits: int = 4, block: int = 32, damp: float = 0.01, lazy: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of W by GPTQ on the Gram matrix G (n x n) of its inputs; float64 throughout.
    Columns are updated `lazy` at a time, the rest of W once per batch (the paper's lazy batch updates)."""
    W = W.to(torch.float64).clone()
    U = _inverse_factor(G.to(W), damp)
    m, n = W.shape
    lazy = block * max(1, lazy // block)  # a batch holds whole blocks, so a block's scales see its updates
    codes = torch.zeros(m, n, dtype=torch.int8, device=W.device)
    scales = torch.zeros(m, (n + block - 1) // block, dtype=W.dtype, device=W.device)
    for b0 in range(0, n, lazy):
        b1 = min(b0 + lazy, n)
        part, errors = W[:, b0:b1].clone(), torch.zeros(m, b1 - b0, dtype=W.dtype, device=W.device)
        for j in range(b1 - b0):
            col = b0 + j
            if col % block == 0:
                scales[:, col // block] = _scales(part[:, j : j + block], bits)
            q = _codes(part[:, j : j + 1], scales[:, col // block], bits)[:, 0]
            codes[:, col] = q.to(torch.int8)
            err = (part[:, j] - q * scales[:, col // block]) / U[col, col]
            part[:, j:] -= err[:, None] * U[col, col:b1][None, :]
            errors[:, j] = err
        W[:, b1:] -= errors @ U[b0:b1, b1:]
    return codes, scales


def pack(codes: torch.Tensor, bits: int = 4, block: int = 32) -> torch.Tensor:
    """MatMulNBits' B: uint8 (m, blocks, block * bits / 8), codes + 2^(b-1), two per byte low nibble first at 4
    bits; the last block of a row padded with zero bytes (as ONNX Runtime pads)."""
    m, n = codes.shape
    blocks = (n + block - 1) // block
    unsigned = torch.zeros(m, blocks * block, dtype=torch.uint8, device=codes.device)
    unsigned[:, :n] = (codes.to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)
    if bits == 4:
        unsigned = unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)
    return unsigned.reshape(m, blocks, -1)


def _output_error(R: torch.Tensor, G: torch.Tensor) -> float:
    """||R X||_F^2 / T = trace(R G R^T) for the inputs' Gram matrix G = X X^T / T."""
    return float(((R @ G) * R).sum())


def quantized_low_rank(
    W: torch.Tensor,
    G: torch.Tensor,
    rank: int,
    bits: int = 4,
    block: int = 32,
    iterations: int = 1,
    use_gptq: bool = True,
    damp: float = 0.01,
    rel_eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scales, A, B) with W ~ dequantize(codes, scales) + B A, A (rank x n), B (m x rank), float64:
    Q by GPTQ (or rounding to nearest) of W - B A, B A the whitened rank-k fit of W - Q, `iterations` times."""
    W = W.to(torch.float64)
    G = G.to(W)
    low, best = torch.zeros_like(W), None
    for _ in range(iterations):
        target = W - low
        codes, scales = quantize(target, G, bits, block, use_gptq, damp)
        residual = W - dequantize(codes, scales, block)
        U, S, Vh, L = whitened_spectrum(residual, G, rel_eps)  # SVD-LLM's truncation of the residual
        A, B = split_factors(U, S, Vh, rank)
        A = torch.linalg.solve_triangular(L, A, upper=False, left=False)
        low = B @ A
        error = _output_error(residual - low, G)
        if best is None or error < best[0]:
            best = (error, codes, scales, A, B)
    return best[1], best[2], best[3], best[4]
