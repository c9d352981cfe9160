"""``svdkit export``: write a model (compressed or dense) for another runtime: ONNX Runtime."""

from __future__ import annotations

import argparse

from ..core.atomic import check_not_source, prepare_output_dir
from ..core.owner import own_output
from ..deploy.onnx import WEIGHTS, export_onnx
from ..deploy.quantize import QUANTIZERS, Quantization
from ..deploy.runtime import is_onnx_folder
from ..errors import SvdkitError
from ..sources.mixture import mixture_windows
from ..sources.models import load_model
from .common import emit, positive

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    e = sub.add_parser("export", help="write a model, compressed or dense, as an ONNX graph with a KV cache")
    e.add_argument("model", help="model folder (compressed or not), hub id, .gguf file, or 'smollm2-135m'")
    e.add_argument("--format", choices=("onnx",), default="onnx", help="the runtime to export for (onnx)")
    e.add_argument("--output", required=True, help="the folder to write")
    e.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="float32",
        help="int8 / int4: ONNX Runtime's weight-only block quantization of every matrix, factors and dense "
        "matrices alike, and of the token embedding (default float32)",
    )
    e.add_argument(
        "--quantizer",
        choices=QUANTIZERS,
        default="rtn",
        help="how int8 / int4 weights are chosen: rtn (round to nearest, symmetric), hqq (half-quadratic, "
        "asymmetric, no data; int4), gptq (error feedback through calibration windows' Gram matrices; int4) "
        "(default rtn)",
    )
    e.add_argument("--block-size", type=positive, default=32, help="weights per quantization block (default 32)")
    e.add_argument(
        "--keep-embedding", action="store_true", help="leave the token embedding in float32 (a tied head too)"
    )
    e.add_argument("--calib", default="demo", metavar="SPEC", help="gptq's calibration text, as compress's (demo)")
    e.add_argument("--calib-samples", type=positive, default=8, help="gptq's calibration windows (default 8)")
    e.add_argument("--calib-seqlen", type=positive, default=512, help="tokens per calibration window (default 512)")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    e.set_defaults(run=run)


def run(a: argparse.Namespace) -> None:
    if is_onnx_folder(a.model):
        raise SvdkitError(f"'{a.model}' is already an ONNX export: export the model it was made from")
    check_not_source(a.model, a.output)
    quantization = Quantization(8 if a.weights == "int8" else 4, a.block_size, a.quantizer, not a.keep_embedding)
    if a.weights != "float32":
        quantization.check()
    elif quantization != Quantization(4):
        raise SvdkitError("--quantizer, --block-size and --keep-embedding are for int8 / int4 --weights")
    if (a.calib, a.calib_samples, a.calib_seqlen) != ("demo", 8, 512) and a.quantizer != "gptq":
        raise SvdkitError("--calib, --calib-samples and --calib-seqlen are gptq's calibration: add --quantizer gptq")
    with own_output(a.output):
        out = prepare_output_dir(a.output, a.overwrite)
        model, tok = load_model(a.model, dtype="float32")
        calibration = None
        if a.weights != "float32" and a.quantizer == "gptq":
            calibration = mixture_windows(a.calib, a.calib_samples, a.calib_seqlen, tokenizer=tok, model=model)
        manifest = export_onnx(
            model, tok, out, a.weights, str(a.model), a.overwrite, quantization=quantization, calibration=calibration
        )
    what = f"{a.weights} weights"
    if a.weights != "float32":
        what += f" by {a.quantizer}, blocks of {a.block_size}"
    print(
        f"ONNX export ({what}, {manifest['bytes']:,} bytes) written to {out}; logits within "
        f"{manifest['max_relative_logit_difference']:.1e} of the torch model's. Run it: svdkit eval {out}"
    )
    emit({k: v for k, v in manifest.items() if k not in ("cache", "compression")}, a.json)
