"""Cross-check svdkit's svd-llm against an independent re-implementation of the authors' numerics.

The SVD-LLM reference code (github.com/AIoT-MLSys-Lab/SVD-LLM, SVDLLM.py) differs from svdkit in
implementation, not in math: it hooks the whole model's forward (no layer-by-layer engine), sums the
Gram matrices in float32, adds an absolute 1e-6 jitter to the raw sum only when Cholesky fails, inverts
L explicitly, and runs the SVD in float32. This script re-implements exactly that path (it is written
here, not copied) on the protocol's calibration windows and prints both perplexities side by side.

    python benchmarks/reference_check.py --ratios 0.2 0.4 0.6 --out docs/results/reference_check
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

import svdkit
from svdkit.calibration.collect import collect_statistics
from svdkit.core.lowrank import LowRankLinear
from svdkit.sources.text import calibration_windows, load_text, tokenize

HERE = Path(__file__).resolve().parent


@torch.no_grad()
def reference_grams(model, windows) -> dict[str, torch.Tensor]:
    """Raw X^T X per decoder linear, summed in float32 over a full-model forward (as the reference)."""
    grams: dict[str, torch.Tensor] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".layers." in name:

            def hook(m, args, out, name=name):
                x = args[0].detach().float()
                g = (x.transpose(1, 2) @ x).sum(0)
                grams[name] = grams[name] + g if name in grams else g

            handles.append(mod.register_forward_hook(hook))
    for i, ids in enumerate(windows):
        model(input_ids=ids[None], use_cache=False)
        print(f"\rreference profiling {i + 1}/{len(windows)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for h in handles:
        h.remove()
    return grams


@torch.no_grad()
def reference_whitening(model, grams: dict[str, torch.Tensor], ratio: float) -> None:
    """The reference's whitening: float64 Cholesky (absolute 1e-6 jitter on failure), float32 SVD."""
    for name, raw in grams.items():
        linear = model.get_submodule(name)
        G = raw.double()
        try:
            L = torch.linalg.cholesky(G)
        except RuntimeError:
            G = G + (-torch.linalg.eigvalsh(G)[0] + 1e-6) * torch.eye(G.shape[0], dtype=G.dtype)
            L = torch.linalg.cholesky(G)
        L_inv = torch.linalg.inv(L).float()
        L = L.float()
        W = linear.weight.float()
        U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
        k = int(W.shape[0] * W.shape[1] * (1 - ratio) / (W.shape[0] + W.shape[1]))
        root = torch.diag(S[:k].sqrt())
        model.set_submodule(name, LowRankLinear.from_factors(root @ (Vh[:k] @ L_inv), U[:, :k] @ root))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.4, 0.6])
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--out", default=str(HERE.parent / "results" / "reference_check"))
    args = p.parse_args()

    model, tok = svdkit.load_model("smollm2-135m")
    wiki = tokenize(tok, load_text(Path(args.data_dir) / "wikitext-2-raw" / "wiki.test.raw"))
    windows = calibration_windows(wiki, args.calib_samples, args.seqlen, offset=150000, seed=0)
    evaluation = dict(seqlen=args.seqlen, max_windows=args.eval_windows, progress=False)

    t = time.perf_counter()
    grams = reference_grams(model, windows)
    ref_calib = time.perf_counter() - t
    t = time.perf_counter()
    stats = collect_statistics(model, svdkit.find_architecture(model), windows, {"gram"}, torch.device("cpu"))
    ours_calib = time.perf_counter() - t

    rows = []
    for ratio in args.ratios:
        ref = copy.deepcopy(model)
        reference_whitening(ref, grams, ratio)
        ours = copy.deepcopy(model)
        svdkit.compress(  # exact ranks, as the reference code keeps
            ours, tok, method="svd-llm", ratio=ratio, statistics=stats, device="cpu", progress=False, rank_multiple=1
        )
        row = {
            "ratio": ratio,
            "reference_ppl": svdkit.perplexity(ref, None, wiki, **evaluation).ppl,
            "svdkit_ppl": svdkit.perplexity(ours, None, wiki, **evaluation).ppl,
            "params_reference": svdkit.count_parameters(ref),
            "params_svdkit": svdkit.count_parameters(ours),
        }
        rows.append(row)
        print(row, flush=True)
        del ref, ours

    lines = [
        "# svd-llm against the reference numerics (SmolLM2-135M, protocol windows)",
        "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- calibration: {args.calib_samples} x {args.seqlen} WikiText-2 test tokens from offset 150000, seed 0; "
        f"reference-style full-model profiling {ref_calib:.0f} s, svdkit layer-wise {ours_calib:.0f} s",
        f"- evaluation: WikiText-2 test, first {args.eval_windows} windows of {args.seqlen}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        "| ratio | reference-numerics ppl | svdkit ppl | relative difference | parameters (both) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        diff = (r["svdkit_ppl"] - r["reference_ppl"]) / r["reference_ppl"]
        lines.append(
            f"| {r['ratio']} | {r['reference_ppl']:.3f} | {r['svdkit_ppl']:.3f} | {diff:+.2%} | "
            f"{r['params_svdkit']:,} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
