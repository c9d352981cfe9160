"""Where the prefill time of SmolLM2-135M goes, dense against low-rank, timed in alternation.

    python benchmarks/prefill_check.py [--ratios 0.2 0.4 0.6] [--repeats 7] [--profile 0.4]

Speed depends on the shapes only, so the low-rank models here get random factors at the ranks uniform
allocation gives (the ranks of svd-llm, svd, asvd, ... at that ratio): no calibration needed. Prints the
generation-prefill tokens/s of each (2048 tokens, cache filled, last logits only; median of --repeats,
models interleaved, see svdkit.speed.paired_speed) and, with --profile, torch's operator breakdown of
one prefill of the dense model and of the model at that ratio.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.profiler import ProfilerActivity, profile

import svdkit
from svdkit.lowrank import LowRankLinear
from svdkit.speed import paired_speed, prefill


def low_rank_copy(model, ratio: float):
    """A copy whose targets are LowRankLinear at uniform allocation's ranks, with random factors."""
    work = copy.deepcopy(model)
    ranks = svdkit.allocate_uniform(svdkit.find_architecture(work).shapes(), ratio)
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
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--profile", type=float, default=None, help="also profile the dense model and this ratio")
    a = p.parse_args()
    model, _ = svdkit.load_model("smollm2-135m", progress=False)
    ids = torch.randint(0, model.config.vocab_size, (a.seqlen,), generator=torch.Generator().manual_seed(0))
    models = {"dense": model, **{str(r): low_rank_copy(model, r) for r in a.ratios}}
    speed = paired_speed(models, ids, new_tokens=0, repeats=a.repeats, only=("prefill_tok_s",))
    print(f"| model | parameters | prefill tok/s | vs dense |  (torch threads {torch.get_num_threads()})")
    print("|---|---|---|---|")
    for name, s in speed.items():
        ratio = s["prefill_tok_s"] / speed["dense"]["prefill_tok_s"]
        params = svdkit.count_parameters(models[name])
        print(f"| {name} | {params:,} | {s['prefill_tok_s']:.0f} | {ratio:.2f}x |")
    if a.profile is not None:
        print("\nprofile of one prefill, seconds of operator self time:")
        for name in ("dense", str(a.profile)):
            parts = breakdown(models[name], ids)
            total = sum(parts.values())
            print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()) + f", total {total:.2f}")


if __name__ == "__main__":
    main()
