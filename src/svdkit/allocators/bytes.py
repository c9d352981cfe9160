"""Ranks under a byte budget: the corrections of a stored base (qlr's W ~ Q + B A) get the bytes the base leaves.

The budget is bits per weight over the targets, counted as a runtime stores them: every base at its own
layout (:class:`~svdkit.methods.base.StoredBase`'s ``nbytes``), every pair A (k x n) and B (m x k) at
`pair_bits` in blocks of `pair_block` along its inputs (``svdkit export --weights int4`` writes them so: int4
in blocks of 32, the default). What is left after the bases is spent greedily on rank, one step at a time
(step = the plan's rank multiple):
matrix i's output error at rank k is e_i(k) = sum_{j > k} s_j^2, s the whitened singular values of its
base's residual (``spectrum``), and each step goes to the matrix whose error falls most per byte it costs
(e_i(k) - e_i(k + step)) / (bytes_i(k + step) - bytes_i(k)), while the budget allows. The errors are
convex in k (s falls), so with a rank multiple that is a multiple of `pair_block` (equal bytes a step) this greedy
is the optimum of the summed error up to the bytes it leaves unspent (bit allocation as in transform coding).
Every target keeps at least one step (or half its smaller
side, if less); none goes beyond `max_rank` or half its smaller side (qlr's own cap).

Cost: the spectra are computed as each layer is calibrated (the summary pass): the base quantized once and
one whitened SVD per matrix; the factor pass quantizes again.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..core.options import Options, choice, integer, number, option, power_of_two
from ..errors import SvdkitError
from ..methods.blockquant import block_bytes
from .base import AllocationContext, register_allocator

__all__ = ["BytesAllocationConfig", "allocate_bytes", "check_budget", "pair_bytes", "residual_spectra"]


@dataclass
class BytesAllocationConfig(Options):
    bits_per_weight: float = option(
        5.0,
        "the budget: bits per weight of the targets, bases and pairs together as stored (5.0 is int4 in blocks "
        "of 32 with a float32 scale, ONNX Runtime's int4 export of the dense model)",
        number(0.5, 32),
    )
    pair_bits: int = option(4, "bits A and B are stored in (4 or 8 in blocks; 16 or 32: floats)", choice(4, 8, 16, 32))
    pair_block: int = option(
        32, "weights per block of A's and B's rows (a power of two, at least 16)", power_of_two(16)
    )
    max_rank: int = option(512, "no correction beyond this rank", integer(1))


def pair_bytes(m: int, n: int, k: int, config: BytesAllocationConfig) -> int:
    """Bytes of A (k x n) and B (m x k), blocked along each one's inputs."""
    return block_bytes(k, n, config.pair_bits, config.pair_block) + block_bytes(
        m, k, config.pair_bits, config.pair_block
    )


@torch.no_grad()
def residual_spectra(
    weights: Mapping[str, torch.Tensor],
    statistics: Mapping[str, Any],
    config: BytesAllocationConfig,
    device=None,
    method=None,
    method_config=None,
) -> dict[str, torch.Tensor]:
    """One layer's summary: per target the singular values its correction's rank truncates (the method's)."""
    dev = device or torch.device("cpu")
    spectrum = method.base.spectrum
    return {n: spectrum(w.detach().to(dev, torch.float64), statistics[n], method_config) for n, w in weights.items()}


def _candidates(m: int, n: int, step: int, config: BytesAllocationConfig) -> list[int]:
    top = min(config.max_rank, min(m, n) // 2)
    return list(range(step, top + 1, step)) or [max(1, top)]


def _floor(shapes, config: BytesAllocationConfig, method, method_config, step: int) -> tuple[dict, dict]:
    """Every target's candidate ranks, and its bytes at the smallest (its base and one rank step)."""
    ks = {name: _candidates(m, n, step, config) for name, (m, n) in shapes.items()}
    spent = {
        name: method.base.nbytes(m, n, method_config) + pair_bytes(m, n, ks[name][0], config)
        for name, (m, n) in shapes.items()
    }
    return ks, spent


def check_budget(shapes, config: BytesAllocationConfig, method, method_config, step: int) -> None:
    """Refuse a budget below the bases plus the smallest corrections, before anything is calibrated."""
    count = sum(m * n for m, n in shapes.values())
    floor = sum(_floor(shapes, config, method, method_config, step)[1].values())
    if floor > config.bits_per_weight / 8 * count:
        raise SvdkitError(
            f"a budget of {config.bits_per_weight} bits per weight is below the bases and the smallest corrections "
            f"({8 * floor / count:.3f}): raise bits_per_weight, or use larger blocks, fewer bits or a smaller rank "
            "multiple"
        )


@register_allocator(
    "bytes",
    BytesAllocationConfig,
    needs_statistics=True,
    requires=("gram",),
    summarize=residual_spectra,
    corrects_base=True,
    check=check_budget,
    summary="a byte budget (bits per weight) for a quantized base's corrections (qlr): rank where it lowers "
    "the output error most per byte",
)
def allocate_bytes(context: AllocationContext, config: BytesAllocationConfig) -> dict[str, int | None]:
    shapes, step = context.shapes, context.rank_multiple
    check_budget(shapes, config, context.method, context.method_config, step)
    ks, spent = _floor(shapes, config, context.method, context.method_config, step)
    count = sum(m * n for m, n in shapes.values())
    budget, floor = config.bits_per_weight / 8 * count, sum(spent.values())
    tails = {
        name: torch.flip(torch.cumsum(torch.flip(s.double() ** 2, [0]), 0), [0])
        for name, s in context.summaries.items()
    }

    def error(name: str, k: int) -> float:
        tail = tails[name]
        return float(tail[k]) if k < len(tail) else 0.0

    def offer(heap: list, name: str, i: int) -> None:
        if i + 1 < len(ks[name]):
            m, n = shapes[name]
            cost = pair_bytes(m, n, ks[name][i + 1], config) - pair_bytes(m, n, ks[name][i], config)
            gain = error(name, ks[name][i]) - error(name, ks[name][i + 1])
            heapq.heappush(heap, (-gain / max(cost, 1), name, i, cost))

    at = dict.fromkeys(shapes, 0)
    heap: list = []
    for name in shapes:
        offer(heap, name, 0)
    total = floor
    while heap:
        _, name, i, cost = heapq.heappop(heap)
        if total + cost <= budget:
            total, at[name] = total + cost, i + 1
            offer(heap, name, i + 1)
    context.report.update({"bits_per_weight": round(8 * total / count, 4), "bytes": int(total)})
    return {name: ks[name][i] for name, i in at.items()}
