"""``svdkit bench``: the protocol's grid (methods x ratios x allocations): quality, time, speed and memory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..bench.cells import PROTOCOL_CALIBRATION, BenchConfig, parse_spec
from ..bench.grid import run_bench
from ..bench.report import markdown
from ..core.owner import own_output
from ..errors import SvdkitError
from ..pipeline.options import CalibrationSettings, CompressionOptions
from ..sources.mixture import parse_calib
from .common import CALIBRATION_FLAGS, add_dtype, add_fields, fields_from_args, nonnegative, positive, ratio

__all__ = ["add_parser", "add_bench_arguments", "bench_config", "run"]

BENCH_CALIBRATION_FLAGS = {
    "source": {
        **CALIBRATION_FLAGS["source"],
        "help": "calibration text, the grammar of 'svdkit compress --calib' (e.g. wikitext2:16,demo:8 or self); "
        "a named part without [START:END] is drawn from the protocol's range, clear of the test and validation "
        "windows (wikitext2 from --calib-offset, ptb [32768:], demo [:-32768]), a file whole; named texts come "
        "from --data-dir",
    },
    **{k: v for k, v in CALIBRATION_FLAGS.items() if k in ("samples", "seed")},
    "offset": {
        **CALIBRATION_FLAGS["offset"],
        "help": "where WikiText-2's calibration range starts (the protocol's: after the validation slice)",
    },
    "seqlen": {"flag": "--seqlen", "type": positive, "help": "tokens per window, calibration and evaluation"},
}
"""the calibration flags of ``svdkit bench``: one --seqlen for every window"""


def add_parser(sub) -> None:
    b = sub.add_parser(
        "bench",
        help="the protocol's grid: methods x ratios x allocations, quality, time, speed and memory",
        description=(
            "Run the fixed protocol over a grid of cells; write results.json, results.md and PNG plots into --out. "
            "A cell is METHOD[@ALLOCATION[:KEY=VALUE,...]][+lstsq][+seq][+heal:NAME[,NAME][:NAME.KEY=VALUE,...]] "
            "(e.g. svd-llm+heal:block,kd:kd.epochs=2). A rerun with the same --out resumes from the finished cells."
        ),
    )
    add_bench_arguments(b)
    b.add_argument("--out", required=True, help="folder for results.json, results.md and plots/")
    b.set_defaults(run=run)


def add_bench_arguments(b: argparse.ArgumentParser) -> None:
    """The grid and protocol options of `svdkit bench` (shared with benchmarks/protocol.py)."""
    b.add_argument("--model", default="smollm2-135m", help="model to compress (default smollm2-135m)")
    b.add_argument("--methods", nargs="+", default=["svd", "svd-llm"], metavar="CELL", help="cells (see above)")
    b.add_argument("--ratios", nargs="+", type=ratio, default=[0.2, 0.4, 0.6], help="ratios (0.2 0.4 0.6)")
    b.add_argument(
        "--data-dir",
        default=None,
        help="folder with wikitext-2-raw/wiki.test.raw and ptb/ptb.valid.txt (default: $SVDKIT_DATA, else datasets)",
    )
    defaults = {name: getattr(PROTOCOL_CALIBRATION, name) for name in BENCH_CALIBRATION_FLAGS}
    defaults["samples"] = None  # 32, or a mixture's sum
    add_fields(b, CalibrationSettings, BENCH_CALIBRATION_FLAGS, prefix="calib_", defaults=defaults)
    b.add_argument(
        "--heal-calib",
        metavar="SPEC",
        default=None,
        help="the healing cells' text, in --calib's grammar and ranges (default: the calibration windows)",
    )
    b.add_argument("--eval-windows", type=positive, default=16, help="WikiText-2 evaluation windows (16)")
    b.add_argument("--ptb-windows", type=positive, default=8, help="PTB evaluation windows (8)")
    b.add_argument("--sensitivity-windows", type=positive, default=None, help="sensitivity allocation: windows")
    b.add_argument("--sensitivity-seqlen", type=positive, default=None, help="sensitivity allocation: tokens each")
    add_fields(b, CompressionOptions, {"device": {}, "rank_multiple": {"type": positive, "metavar": "N"}})
    add_dtype(b, default="float32")
    b.add_argument("--no-speed", action="store_true", help="skip the speed and memory measurements")
    b.add_argument("--decode-tokens", type=nonnegative, default=64, help="tokens generated per decode run (64)")
    b.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    b.add_argument(
        "--zero-shot",
        type=nonnegative,
        default=0,
        metavar="N",
        help="the scorecard's zero-shot accuracy for dense and every cell: lm-eval's arc_easy, piqa, hellaswag, "
        "winogrande and boolq on their first N documents, read offline from --data-dir's zeroshot/ (0: none)",
    )
    b.add_argument(
        "--no-perplexity",
        action="store_true",
        help="measure no perplexity: the generation scores (and speed) only, for cells whose perplexity another "
        "run holds",
    )


def bench_config(a: argparse.Namespace) -> BenchConfig:
    """A :class:`svdkit.bench.grid.BenchConfig` from parsed `svdkit bench` arguments."""
    calibration = CalibrationSettings(**fields_from_args(a, CalibrationSettings, BENCH_CALIBRATION_FLAGS, "calib_"))
    if a.heal_calib is not None:
        if not any("+heal:" in cell for cell in a.methods):
            raise SvdkitError("--heal-calib is the healing cells' text, but no cell heals (+heal:NAME)")
        try:
            parse_calib(a.heal_calib)  # a bad spec fails here, before the model loads
        except ValueError as e:
            raise SvdkitError(f"--heal-calib: {e}") from None
    return BenchConfig(
        model=a.model,
        cells=a.methods,
        ratios=a.ratios,
        data_dir=a.data_dir,
        calibration=calibration,
        heal_calib=a.heal_calib,
        eval_windows=a.eval_windows,
        ptb_windows=a.ptb_windows,
        allocation_options={"sensitivity": _given(windows=a.sensitivity_windows, seqlen=a.sensitivity_seqlen)},
        device=a.device,
        dtype=a.dtype,
        speed=not a.no_speed,
        zero_shot=a.zero_shot or None,
        decode_tokens=a.decode_tokens,
        plots=not a.no_plots,
        perplexity=not a.no_perplexity,
        rank_multiple=a.rank_multiple,
    )


def run(a: argparse.Namespace) -> None:
    for spec in a.methods:
        parse_spec(spec)  # bad cells fail before the model loads
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise SvdkitError(f"--out '{out}' exists and is a file: give a folder")
    with own_output(out):
        out.mkdir(parents=True, exist_ok=True)
        report = _bench(a, out)
    print(markdown(report))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'plots'}")


def _bench(a: argparse.Namespace, out: Path) -> dict:
    return run_bench(
        bench_config(a),
        out / "results.json",
        out / "results.md",
        out / "plots",
        command="svdkit " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "svdkit bench",
    )


def _given(**options) -> dict:
    """The options given on the command line (those left at None are not)."""
    return {k: v for k, v in options.items() if v is not None}
