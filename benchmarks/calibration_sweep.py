"""Which calibration text generalizes? svd-llm (optionally healed) calibrated on each text, scored on validation.

    python benchmarks/calibration_sweep.py --ratio 0.2 --out docs/results/calibration/sweep_0.2.jsonl \
        --calib "wikitext2:32" "ptb:32" "demo:32" "self:32" "wikitext2:11,ptb:11,demo:10" "wikitext2:16,self:16"

SmolLM2-135M in float32, ranks in multiples of 8, 32 windows of 2048 per calibration (each part drawn with seed
0). Named parts are drawn away from every test and validation window: WikiText-2 from token 150000, PTB
after its first 16 windows of 2048, Python docs before its last 16 (`svdkit bench`'s ranges). Scored only on
validation data, the windows the protocol sets aside for choosing settings: WikiText-2 test tokens
[40960, 57344), PTB validation windows 8-15, and the 8 Python-docs windows before the protocol's last 8;
'generality' is the geometric mean of the three ppl / dense ppl. Never the test windows or the zero-shot
sets. One JSON line per calibration is appended to --out; calibrations already there are skipped (resume).
`--plot PNG` draws the trade-off from --out's rows: WikiText-2 validation ppl / dense (in-domain) against
generality, one labelled point per calibration.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

from scorecard_table import save_log_plot

import svdkit
from svdkit.bench.cells import protocol_spec
from svdkit.sources.text import load_text, tokenize

W = 2048


def validation_tokens(tok, data: Path) -> dict:
    wiki = tokenize(tok, load_text(data / "wikitext-2-raw" / "wiki.test.raw"))
    ptb = tokenize(tok, load_text(data / "ptb" / "ptb.valid.txt"))
    pydoc = tokenize(tok, load_text("demo"))
    return {"wikitext2": wiki[40960:57344], "ptb": ptb[8 * W : 16 * W], "pydoc": pydoc[-16 * W : -8 * W]}


def scores(model, val: dict) -> dict:
    return {k: svdkit.perplexity(model, None, v, seqlen=W, progress=False).ppl for k, v in val.items()}


def plot(rows: list[dict], path: Path) -> None:
    """In-domain (WikiText-2 validation ppl / dense) against generality, one labelled point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for r in rows:
        x, y = r["validation_ppl"]["wikitext2"] / r["dense"]["wikitext2"], r["generality"]
        label = r["calib"] + ("" if r["heal"] == "none" else f" + heal {r['heal']}")
        ax.scatter(x, y, color="tab:blue")
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set(xlabel="WikiText-2 validation ppl / dense (in-domain)")
    ax.set(ylabel="generality (geometric mean of ppl / dense, 3 domains)")
    ax.set_title(f"svd-llm at {rows[0]['ratio']}: calibration text, in-domain against general", fontsize=10)
    save_log_plot(fig, ax, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--calib", nargs="+", default=["wikitext2:32", "self:32"])
    p.add_argument("--heal", default="none", help="healers after the method, e.g. block,kd")
    p.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--plot", type=Path, help="draw --out's rows into this PNG and stop")
    a = p.parse_args()
    if a.plot is not None:
        plot([json.loads(line) for line in a.out.read_text().splitlines()], a.plot)
        return
    os.environ["SVDKIT_DATA"] = str(a.data_dir)  # named sources read the protocol's files
    done = set()
    if a.out.exists():
        done = {(r["calib"], r["ratio"], r["heal"]) for r in map(json.loads, a.out.read_text().splitlines())}
    dense, tok = svdkit.load_model("smollm2-135m")
    val = validation_tokens(tok, a.data_dir)
    base = scores(dense, val)
    print(json.dumps({"dense": base}), flush=True)
    for calib in a.calib:
        if (calib, a.ratio, a.heal) in done:
            continue
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        svdkit.compress(
            model, tok, method="svd-llm", ratio=a.ratio, calib=protocol_spec(calib, 150000), calib_seqlen=W,
            heal=a.heal, progress=False,
        )  # fmt: skip
        ppl = scores(model, val)
        general = math.exp(sum(math.log(ppl[k] / base[k]) for k in ppl) / len(ppl))
        row = {"calib": calib, "ratio": a.ratio, "heal": a.heal, "validation_ppl": ppl, "dense": base,
               "generality": general, "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
        print(json.dumps(row), flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with a.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
