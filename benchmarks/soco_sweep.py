"""Try SoCo settings on a validation slice, from one cached start decomposition.

    python benchmarks/soco_sweep.py --ratio 0.4 --variant penalty_lr=0.3 --variant penalty_lr=0.3,steps=240

The first run plans a SoCo compression of SmolLM2-135M with the protocol's calibration (32 x 2048
WikiText-2 test tokens at seeded offsets from 150000) and runs the pipeline's stages up to factoring:
every target gets SoCo's start decomposition (svd-llm-v2 at the largest rank that still saves
parameters); the low-rank model and the plan are cached in --cache (about 540 MB); later runs load them.
Each variant then runs the train stage on the calibration windows under the uniform
allocation's budget at --ratio, with exact ranks, and is
scored on WikiText-2 test tokens [40960, 40960 + 4 x 2048), which neither the protocol's evaluation
(the first 16 x 2048) nor its calibration uses. Prints and appends one JSON line per variant to --out.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

import svdkit
from svdkit.allocators.uniform import allocate_uniform
from svdkit.bench.cells import PROTOCOL_CALIBRATION, parse_options
from svdkit.core.lowrank import LowRankLinear
from svdkit.pipeline.options import CompressionOptions
from svdkit.pipeline.plan import make_plan, replan
from svdkit.pipeline.stages import allocate, factor, read_windows, train
from svdkit.sources.text import load_text, tokenize

HERE = Path(__file__).resolve().parent


def start_model(cache: Path, data_dir: Path) -> dict:
    """SoCo's start decomposition of SmolLM2-135M with its plan (the pipeline's stages up to factoring), cached."""
    if cache.exists():
        try:
            saved = torch.load(cache, weights_only=False)
        except (ModuleNotFoundError, AttributeError):  # pickled by an svdkit whose modules had other paths
            saved = {}
        if "plan" not in saved:
            raise SystemExit(f"{cache} was written by an older svdkit: delete it and run again")
        return saved
    model, tok = svdkit.load_model("smollm2-135m")
    wiki = tokenize(tok, load_text(data_dir / "wikitext-2-raw" / "wiki.test.raw"))
    calibration = dataclasses.replace(PROTOCOL_CALIBRATION, source=wiki)
    options = CompressionOptions(method="soco", ratio=0.4, rank_multiple=1, device="cpu", calibration=calibration)
    plan = make_plan(model, options, tokenizer=tok)
    windows = read_windows(plan, tok)
    allocation = allocate(plan, model, None, windows)  # a method with a train stage: its start ranks
    factor(plan, model, allocation.ranks, None, windows)  # calibrates layer by layer as it factors
    saved = {"model": model, "plan": plan, "windows": windows, "val": wiki[40960 : 40960 + 8 * 2048]}
    torch.save(saved, cache)
    return saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--variant", action="append", default=[], help="soco options, e.g. penalty_lr=0.3,steps=240")
    p.add_argument("--cache", default="/tmp/soco-start.pt")
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--out", default="soco_sweep.jsonl")
    p.add_argument("--reference", action="store_true", help="also score svd-llm-v2 at the uniform ranks")
    args = p.parse_args()
    start = start_model(Path(args.cache), Path(args.data_dir))
    val = start["val"][: 4 * 2048]
    if args.reference:  # the leading k components of the start factors are svd-llm-v2 at rank k
        model = copy.deepcopy(start["model"])
        for name, k in allocate_uniform(start["plan"].shapes, args.ratio).items():
            low = model.get_submodule(name)
            if k is None:
                raise SystemExit(f"the uniform allocation keeps {name} dense at {args.ratio}: no reference")
            model.set_submodule(name, LowRankLinear.from_factors(low.A[:k], low.B[:, :k], low.bias))
        ppl = svdkit.perplexity(model, None, val, seqlen=2048, progress=False).ppl
        row = {"ratio": args.ratio, "reference": "svd-llm-v2 uniform", "validation_ppl": ppl}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    for text in args.variant:
        options = parse_options(text)
        model = copy.deepcopy(start["model"])
        plan = replan(start["plan"], ratio=args.ratio, method_options=options)
        t = time.perf_counter()
        ranks, report = train(plan, model, allocate(plan, model, None, start["windows"]))
        seconds = time.perf_counter() - t
        ppl = svdkit.perplexity(model, None, val, seqlen=2048, progress=False).ppl
        row = {"ratio": args.ratio, "options": options, "validation_ppl": ppl, "training_s": round(seconds, 1)}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps({**row, "ranks": ranks, "curve": report["curve"]}) + "\n")


if __name__ == "__main__":
    main()
