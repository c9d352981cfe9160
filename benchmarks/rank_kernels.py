"""How fast the first product of a low-rank layer runs for each rank: GFLOP/s of x A^T, x (tokens x n).

    python benchmarks/rank_kernels.py [--tokens 2048] [--width 576] [--ranks 240 257] [--repeats 30]

Prints one line per rank k in [first, end): the median time of F.linear(x, A) with A (k x width) and
its GFLOP/s (2 tokens width k / time); each of --repeats rounds times every rank once, in turn. On
CPUs the output width k decides how well the matrix kernel vectorises; svdkit.core.ranks.align_ranks
rounds ranks to multiples of 8 for that reason.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--width", type=int, default=576, help="input width n (576: SmolLM2-135M's hidden size)")
    p.add_argument("--ranks", type=int, nargs=2, default=[240, 257], metavar=("FIRST", "END"))
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.tokens, a.width, generator=g)
    print(f"| rank | ms | GFLOP/s |  (tokens {a.tokens}, width {a.width}, threads {torch.get_num_threads()})")
    print("|---|---|---|")
    ranks = list(range(*a.ranks))
    factors = {k: torch.randn(k, a.width, generator=g) for k in ranks}
    for A in factors.values():
        F.linear(x, A)  # warm-up
    times: dict[int, list[float]] = {k: [] for k in ranks}
    for _ in range(a.repeats):  # every rank once per round, so the drift of a shared machine hits all alike
        for k, A in factors.items():
            t = time.perf_counter()
            F.linear(x, A)
            times[k].append(time.perf_counter() - t)
    for k in ranks:
        s = statistics.median(times[k])
        print(f"| {k}{' (x8)' if k % 8 == 0 else ''} | {s * 1e3:.2f} | {2 * a.tokens * a.width * k / s / 1e9:.0f} |")


if __name__ == "__main__":
    main()
