"""Try healing settings on the validation slice, from one cached compressed SmolLM2-135M.

    python benchmarks/heal_sweep.py --method svd-llm --ratio 0.4 --variant block --variant "block:block.lr=3e-4"

The first run for a (method, ratio) compresses SmolLM2-135M with the protocol's calibration (32 x 2048
WikiText-2 test tokens at seeded offsets from 150000; ranks in multiples of 8) through the pipeline's stages
up to the train stage, keeping the dense modules it replaces (the healers' reference); the model, the
reference, the plan and the windows are cached in --cache. Each variant (HEAL[:NAME.KEY=VALUE,...]) then
heals a copy of it and is scored on the protocol's validation slice, WikiText-2 test tokens [40960, 57344)
(8 windows of 2048, which neither the evaluation nor the calibration uses), and on PTB validation's windows
8 to 15 of 2048 (the protocol's cross-domain check reads windows 0 to 7). Prints and appends one JSON line
per variant to --out (the start's scores as variant "none").
With --base HEAL[:OPTIONS] the start is first healed that way once (cached too), and every variant heals
on from there: `--base block --variant kd:kd.lr=1e-4` is `block,kd` without healing the blocks again.
With --mix K the variants (not the base) train on mixed text: the last K of the 28 training windows (the last
4 of the 32 stay held out) are replaced by the first K windows of 2048 of the Python docs
(`pydoc_data.topics`, whose last 8 windows the protocol evaluates). Every row also scores the 8 Python-docs
windows before those.
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
from svdkit.bench.cells import PROTOCOL_CALIBRATION, BenchConfig, parse_options
from svdkit.heal import DenseReference, split_windows
from svdkit.heal.kd import KDConfig
from svdkit.measure.scorecard import PTB_VALIDATION, VALIDATION
from svdkit.pipeline.options import CompressionOptions
from svdkit.pipeline.plan import make_plan, replan
from svdkit.pipeline.stages import allocate, calibrate, factor, heal, read_windows, train
from svdkit.sources.text import load_text, tokenize

PYDOC_WINDOWS = BenchConfig.pydoc_windows
"""the protocol scores the Python docs' last 8 windows; the sweep's validation slice is the 8 before them"""


def start(cache: Path, data_dir: Path, method: str, ratio: float) -> dict:
    """The compressed model before healing, its dense reference, plan, windows and scoring texts (cached)."""
    if cache.exists():
        return torch.load(cache, weights_only=False)
    model, tok = svdkit.load_model("smollm2-135m")
    wiki = tokenize(tok, load_text(data_dir / "wikitext-2-raw" / "wiki.test.raw"))
    ptb = tokenize(tok, load_text(data_dir / "ptb" / "ptb.valid.txt"))
    calibration = dataclasses.replace(PROTOCOL_CALIBRATION, source=wiki)
    options = CompressionOptions(method=method, ratio=ratio, device="cpu", calibration=calibration, heal="kd")
    plan = make_plan(model, options, tokenizer=tok)
    windows = read_windows(plan, tok)
    statistics = calibrate(plan, model, windows)
    allocation = allocate(plan, model, statistics, windows)
    dense = DenseReference()
    factor(plan, model, allocation.ranks, statistics, windows, keep=dense)
    train(plan, model, allocation)
    saved = {"model": model, "dense": dense, "plan": plan, "windows": windows, "wiki": wiki, "ptb": ptb}
    _save(saved, cache)
    return saved


def healed_start(saved: dict, spec: str, cache: Path) -> dict:
    """`saved` with its model healed by `spec` (cached in `cache`)."""
    if cache.exists():
        return torch.load(cache, weights_only=False)
    model, row = healed(spec, saved)
    out = {**saved, "model": model, "base": row}
    _save(out, cache)
    return out


def _save(obj: dict, cache: Path) -> None:
    """Write `cache` whole or not at all (an interrupted run leaves no half-written cache to load)."""
    part = cache.with_suffix(".part")
    torch.save(obj, part)
    part.replace(cache)


def with_pydoc(saved: dict) -> dict:
    """`saved` with the Python-docs tokens (caches written before --mix lack them)."""
    if "pydoc" not in saved:
        _, tok = svdkit.load_model("smollm2-135m", progress=False)
        saved = {**saved, "pydoc": tokenize(tok, load_text("demo"))}
    return saved


def mixed(saved: dict, k: int) -> dict:
    """`saved` whose last `k` training windows are the first `k` Python-docs windows (held-out ones kept)."""
    train, held = split_windows(saved["windows"], KDConfig.held_out, "--mix")  # block's share is the same
    seqlen = train.shape[1]
    if not 0 < k <= len(train) or k * seqlen > len(saved["pydoc"]) - 2 * PYDOC_WINDOWS * seqlen:
        raise SystemExit(f"--mix {k}: between 1 and {len(train)} windows, before the Python-docs validation slice")
    docs = saved["pydoc"][: k * seqlen].reshape(k, seqlen)
    return {**saved, "windows": torch.cat([train[: len(train) - k], docs, held])}


def score(model, saved: dict) -> dict:
    def ppl(tokens: torch.Tensor) -> float:
        return round(svdkit.perplexity(model, None, tokens, seqlen=2048, progress=False).ppl, 3)

    pydoc = saved["pydoc"][-2 * PYDOC_WINDOWS * 2048 : -PYDOC_WINDOWS * 2048]
    return {
        "validation_ppl": ppl(saved["wiki"][VALIDATION[0] : VALIDATION[1]]),
        "ptb_validation_ppl": ppl(saved["ptb"][PTB_VALIDATION[0] : PTB_VALIDATION[1]]),
        "pydoc_validation_ppl": ppl(pydoc),
    }


def healed(spec: str, saved: dict) -> tuple[torch.nn.Module, dict]:
    """A copy of the start healed by `spec` ('none': not healed) and its row: healing time, held-out losses."""
    name, _, opts = spec.partition(":")
    row: dict = {"variant": spec}
    model = copy.deepcopy(saved["model"])
    if name != "none":
        plan = replan(saved["plan"], heal=name, heal_options=parse_options(opts))
        t = time.perf_counter()
        reports = heal(plan, model, saved["dense"], saved["windows"])
        row["healing_s"] = round(time.perf_counter() - t, 1)
        row["held_out"] = {k: _held_out(r) for k, r in reports.items()}
    return model, row


def variant(spec: str, saved: dict) -> dict:
    model, row = healed(spec, saved)
    return {**row, **score(model, saved)}


def _held_out(report: dict) -> list[float]:
    rows = report.get("layers") or [report]
    return [round(sum(r[k] for r in rows) / len(rows), 6) for k in ("held_out_start", "held_out_best")]


def _slug(spec: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="svd-llm")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--variant", action="append", default=[], help="HEAL[:NAME.KEY=VALUE,...]; 'none' = no healing")
    p.add_argument("--base", default=None, help="HEAL[:OPTIONS] applied once (cached) before every variant")
    p.add_argument("--mix", type=int, default=0, help="train on K Python-docs windows in place of K WikiText-2 ones")
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--out", type=Path, default=Path("heal_sweep.jsonl"))
    a = p.parse_args()
    torch.manual_seed(0)
    cache = a.cache or Path(f"/tmp/heal-start-{a.method}-{a.ratio}.pt")
    saved = with_pydoc(start(cache, a.data_dir, a.method, a.ratio))
    base = {}
    if a.base:
        healed_base = healed_start(saved, a.base, cache.with_name(f"{cache.stem}-{_slug(a.base)}.pt"))
        saved = {**saved, "model": healed_base["model"], "base": healed_base["base"]}
        base = {"base": a.base, "base_healing_s": saved["base"].get("healing_s")}
    if a.mix:
        saved, base = mixed(saved, a.mix), {**base, "mix": a.mix}
    for spec in a.variant or ["none"]:
        row = {"method": a.method, "ratio": a.ratio, **base, **variant(spec, saved)}
        print(json.dumps(row), flush=True)
        with a.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
