"""Q + LR: a block-quantized base plus an activation-aware low-rank correction, W ~ Q + B A.

Q is W block-quantized in the layout runtimes execute natively (ONNX Runtime's MatMulNBits: `bits` per weight,
one scale per `block` inputs of a row, symmetric), chosen by GPTQ (Frantar et al. 2023) from the Gram matrix
of the layer's inputs, or by rounding to nearest. B A (rank `rank`) minimizes ||(W - Q - B A) X||_F: SVD-LLM's
whitened truncation of the residual W - Q (LQER, Zhang et al. ICML'24; QERA, ICLR'25; EoRA). With
`iterations` > 1, Q is made again from W - B A and B A refit (CALDERA, Saha et al. NeurIPS'24), keeping the
pair of smallest output error. The math is :func:`svdkit.methods.blockquant.quantized_low_rank`.

The rank is the method's own (no parameter ratio): every target gets `rank`, at most half its smaller side,
unless the ``bytes`` allocation spends a byte budget on the corrections (from the whitened spectra of each
base's residual, :func:`residual_spectrum`). Bytes, not parameters, are what it saves: the base costs
bits / 8 + 4 / block bytes a weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..calibration.statistics import LinearStats
from ..core.options import Options, choice, integer, number, option, power_of_two
from .base import Compact, Quantized, StoredBase, register
from .blockquant import block_bytes, dequantize, quantize, quantized_low_rank
from .svd_llm import whitened_spectrum

__all__ = ["QLRConfig", "base_bytes", "qlr", "qlr_ranks", "residual_spectrum"]


@dataclass
class QLRConfig(Options):
    bits: int = option(4, "bits per weight of the quantized base (4 or 8)", choice(4, 8))
    block: int = option(32, "weights per block along a row (a power of two, at least 16)", power_of_two(16))
    rank: int = option(32, "rank of the low-rank correction of every matrix", integer(1))
    quantizer: str = option("gptq", "the base by gptq (from the Gram matrix) or rtn", choice("gptq", "rtn"))
    iterations: int = option(1, "quantize / refit rounds (CALDERA's alternation); the best is kept", integer(1))
    damp: float = option(0.01, "GPTQ's damping, relative to the Gram matrix's mean diagonal", number(0, 1))
    rel_eps: float = option(
        1e-6, "jitter added to a non-positive-definite Gram matrix, relative to its largest eigenvalue", number(0, 1)
    )


def qlr_ranks(shapes: Mapping[str, tuple[int, int]], config: QLRConfig) -> dict[str, int]:
    """Every target's correction rank: `rank`, at most half its smaller side (at least 1)."""
    return {name: max(1, min(config.rank, min(m, n) // 2)) for name, (m, n) in shapes.items()}


def residual_spectrum(W: torch.Tensor, stats: LinearStats, config: QLRConfig) -> torch.Tensor:
    """s((W - Q) L), G = L L^T: the whitened singular values of the first round's residual, which the
    correction's rank truncates (the output error left at rank k is sum_{j > k} s_j^2)."""
    W = W.to(torch.float64)
    G = stats.gram_mean.to(W)
    codes, scales = quantize(W, G, config.bits, config.block, config.quantizer == "gptq", config.damp)
    return whitened_spectrum(W - dequantize(codes, scales, config.block), G, config.rel_eps)[1].cpu()


def base_bytes(m: int, n: int, config: QLRConfig) -> int:
    """Bytes of an m x n base in MatMulNBits' layout."""
    return block_bytes(m, n, config.bits, config.block)


@register(
    "qlr",
    QLRConfig,
    requires=("gram",),
    summary="a GPTQ-quantized base (MatMulNBits layout) plus the whitened low-rank fit of its error",
    paper="LQER (ICML'24), QERA (ICLR'25), CALDERA (NeurIPS'24); GPTQ, arXiv 2210.17323",
    ranks=qlr_ranks,
    base=StoredBase(residual_spectrum, base_bytes),
)
def qlr(W: torch.Tensor, stats: LinearStats | None, rank: int, config: QLRConfig) -> Compact:
    """Q by GPTQ (or rounding) of W - B A, B A the whitened rank-k fit of W - Q (`iterations` rounds)."""
    if stats is None:
        raise ValueError("qlr needs the Gram matrix of the layer's calibration inputs")
    codes, scales, A, B = quantized_low_rank(
        W,
        stats.gram_mean,
        rank,
        config.bits,
        config.block,
        config.iterations,
        config.quantizer == "gptq",
        config.damp,
        config.rel_eps,
    )
    return Compact(A, B, Quantized(codes, scales, config.bits, config.block))
