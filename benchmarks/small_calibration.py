"""Training stages on little calibration data: do SoCo and healing end worse than the closed form?

    python benchmarks/small_calibration.py --samples 8 --seqlen 512 --ratio 0.4 \
        --cells svd-llm soco svd-llm+heal:block svd-llm+heal:kd soco+heal:block,kd

SmolLM2-135M, calibrated on `samples` windows of `seqlen` WikiText-2 test tokens at the protocol's seeded
offsets (from 150000), ranks in multiples of 8, each cell from a fresh copy of the dense model with the
methods' default settings; scored on the first 4 windows of 512 WikiText-2 test tokens (as issue 20's
measurement of 2026-11-25) and on the protocol's validation slice (tokens [40960, 57344), 8 x 2048).
Prints one JSON line per cell (compression and training seconds, the training stages' held-out reports).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import svdkit
from svdkit.bench.cells import parse_spec
from svdkit.sources.text import load_text, tokenize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--cells", nargs="+", default=["svd-llm", "soco"])
    p.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    a = p.parse_args()
    dense, tok = svdkit.load_model("smollm2-135m")
    wiki = tokenize(tok, load_text(a.data_dir / "wikitext-2-raw" / "wiki.test.raw"))
    for cell in a.cells:
        spec = parse_spec(cell)
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        r = svdkit.compress(
            model, tok, method=spec.method, ratio=a.ratio, calib=wiki, calib_samples=a.samples,
            calib_seqlen=a.seqlen, calib_offset=150000, heal=spec.heal, progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - t
        test = svdkit.perplexity(model, None, wiki, seqlen=512, max_windows=4, progress=False).ppl
        val = svdkit.perplexity(model, None, wiki[40960:57344], seqlen=2048, progress=False).ppl
        guard = {k: v for k, v in r.training.items() if k.startswith(("held_out_", "fell", "epochs", "steps"))}
        heal = {n: {k: v for k, v in h.items() if not isinstance(v, list)} for n, h in r.healing.items()}
        row = {"cell": cell, "ratio": a.ratio, "calibration": f"{a.samples} x {a.seqlen}", "test_4x512": round(test, 2),
               "validation": round(val, 2), "seconds": round(seconds, 1), "timings": r.timings, "soco": guard,
               "heal": heal}  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
