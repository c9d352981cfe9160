"""Where the prefill time of SmolLM2-135M goes, dense against low-rank, timed in alternation.

    python benchmarks/prefill_check.py [--ratios 0.2 0.4 0.6] [--rank-multiples 1 8] [--repeats 5] [--profile 0.4]

Speed depends on the shapes only, so the low-rank models here get random factors at the ranks uniform
allocation gives (the ranks of svd-llm, svd, asvd, ... at that ratio), rounded by
svdkit.core.ranks.align_ranks to each of --rank-multiples (1: exact): no calibration needed. Each
low-rank model is timed against the dense one alone, as `svdkit bench` times a cell: generation
prefills of 2048 tokens (cache filled, last logits only), the two models in alternation
(svdkit.measure.speed.paired_speed, median of --repeats), once in each order (dense first, then low-rank
first). Prints both ratios and, with --profile, torch's operator breakdown of one prefill of the dense
model and of the model at that ratio (first multiple).

The pairs matter: interleaving the dense model with four low-rank models at once (the first version
of this script) measured 0.4 with ranks in multiples of 8 at 1.24x, where this version measured 1.29x
and 1.31x on the same day (docs/results/README.md).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

import svdkit
from svdkit.core.lowrank import LowRankLinear
from svdkit.core.ranks import align_ranks
from svdkit.measure.speed import paired_speed, prefill


def low_rank_copy(model, ratio: float, multiple: int = 1):
    """A copy whose targets are LowRankLinear at uniform allocation's (aligned) ranks, with random factors."""
    work = copy.deepcopy(model)
    shapes = svdkit.find_architecture(work).shapes()
    ranks = align_ranks(svdkit.allocate_uniform(shapes, ratio), shapes, multiple)
    g = torch.Generator().manual_seed(0)
    for name, k in ranks.items():
        if k is None:
            continue
        lin = work.get_submodule(name)
        A = torch.randn(k, lin.in_features, generator=g) * 0.02
        B = torch.randn(lin.out_features, k, generator=g) * 0.02
        work.set_submodule(name, LowRankLinear.from_factors(A, B))
    return work


def breakdown(model, ids: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        prefill(model, ids[None])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            prefill(model, ids[None])
    groups = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for e in prof.key_averages():
        if e.key in ("aten::mm", "aten::addmm", "aten::bmm"):
            groups["matmul"] += e.self_cpu_time_total
        elif "scaled_dot_product" in e.key:
            groups["attention"] += e.self_cpu_time_total
        else:
            groups["other"] += e.self_cpu_time_total
    return {k: v / 1e6 for k, v in groups.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--rank-multiples", type=int, nargs="+", default=[8], help="rank alignments to compare (8)")
    p.add_argument("--profile", type=float, default=None, help="also profile the dense model and this ratio")
    a = p.parse_args()
    model, _ = svdkit.load_model("smollm2-135m", progress=False)
    ids = torch.randint(0, model.config.vocab_size, (a.seqlen,), generator=torch.Generator().manual_seed(0))
    print(
        f"| ratio, rank multiple | parameters | prefill tok/s | vs dense, dense first | low-rank first |  "
        f"(threads {torch.get_num_threads()})"
    )
    print("|---|---|---|---|---|")
    profiled = None
    for r in a.ratios:
        for k in a.rank_multiples:
            pair = {"dense": model, "low": low_rank_copy(model, r, k)}
            ratios, speeds = [], []
            for order in (("dense", "low"), ("low", "dense")):
                speed = paired_speed({m: pair[m] for m in order}, ids, 0, repeats=a.repeats, only=("prefill_tok_s",))
                ratios.append(speed["low"]["prefill_tok_s"] / speed["dense"]["prefill_tok_s"])
                speeds.append(speed["low"]["prefill_tok_s"])
            params = svdkit.count_parameters(pair["low"])
            print(
                f"| {r} x{k} | {params:,} | {statistics.mean(speeds):.0f} | {ratios[0]:.2f}x | {ratios[1]:.2f}x |",
                flush=True,
            )
            if (r, k) == (a.profile, a.rank_multiples[0]):
                profiled = pair["low"]
    if a.profile is not None:
        if profiled is None:
            profiled = low_rank_copy(model, a.profile, a.rank_multiples[0])
        print("\nprofile of one prefill, seconds of operator self time:")
        for name, m in (("dense", model), (f"{a.profile} x{a.rank_multiples[0]}", profiled)):
            parts = breakdown(m, ids)
            total = sum(parts.values())
            print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()) + f", total {total:.2f}")


if __name__ == "__main__":
    main()
