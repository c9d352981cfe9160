"""Try SoCo settings on a validation slice, from one cached start decomposition.

    python benchmarks/soco_sweep.py --ratio 0.4 --variant penalty_lr=0.3 --variant penalty_lr=0.3,steps=240

The first run computes the protocol's statistics (32 x 2048 WikiText-2 test tokens at seeded offsets
from 150000), factors every target with SoCo's start decomposition (svd-llm-v2 at the largest rank that
still saves parameters) and caches the low-rank model in --cache (about 540 MB); later runs load it. Each
variant then trains on the calibration windows under the uniform allocation's budget at --ratio and is
scored on WikiText-2 test tokens [40960, 40960 + 4 x 2048), which neither the protocol's evaluation
(the first 16 x 2048) nor its calibration uses. Prints and appends one JSON line per variant to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import types
from pathlib import Path

import torch

import svdkit
from svdkit.allocators.uniform import allocate_uniform
from svdkit.bench.grid import parse_options
from svdkit.calibration.collect import collect_statistics
from svdkit.core.architecture import find_architecture
from svdkit.core.lowrank import LowRankLinear
from svdkit.methods import get_method, make_config
from svdkit.methods.soco import SoCoConfig, start_ranks
from svdkit.methods.soco.training import learn_spectrum
from svdkit.pipeline.compress import decompose_linear
from svdkit.sources.text import calibration_windows, load_text, tokenize

HERE = Path(__file__).resolve().parent


def start_model(cache: Path, data_dir: Path) -> dict:
    if cache.exists():
        return torch.load(cache, weights_only=False)
    model, tok = svdkit.load_model("smollm2-135m")
    wiki = tokenize(tok, load_text(data_dir / "wikitext-2-raw" / "wiki.test.raw"))
    windows = calibration_windows(wiki, 32, 2048, 150000, 0)
    arch = find_architecture(model)
    stats = collect_statistics(model, arch, windows, {"gram"}, torch.device("cpu"))
    shapes = arch.shapes()
    base = get_method("svd-llm-v2")
    for name, k in start_ranks(shapes, SoCoConfig()).items():
        low = decompose_linear(
            model.get_submodule(name), base, make_config(base), stats[name], k, torch.device("cpu"), name
        )
        model.set_submodule(name, low)
    saved = {"model": model, "windows": windows, "val": wiki[40960 : 40960 + 8 * 2048], "shapes": shapes}
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
    shapes, val = start["shapes"], start["val"][: 4 * 2048]
    budget = allocate_uniform(shapes, args.ratio)
    if args.reference:  # the leading k components of the start factors are svd-llm-v2 at rank k
        model = copy.deepcopy(start["model"])
        for name, k in budget.items():
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
        config = make_config(get_method("soco"), options)
        context = types.SimpleNamespace(
            shapes=shapes, device=torch.device("cpu"), windows=start["windows"], progress=True
        )
        t = time.perf_counter()
        ranks, report = learn_spectrum(model, context, budget, config)
        seconds = time.perf_counter() - t
        ppl = svdkit.perplexity(model, None, val, seqlen=2048, progress=False).ppl
        row = {"ratio": args.ratio, "options": options, "validation_ppl": ppl, "training_s": round(seconds, 1)}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps({**row, "ranks": ranks, "curve": report["curve"]}) + "\n")


if __name__ == "__main__":
    main()
