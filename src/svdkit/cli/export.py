"""``svdkit export``: write a model (compressed or dense) for another runtime: ONNX Runtime."""

from __future__ import annotations

import argparse

from ..core.atomic import check_not_source, prepare_output_dir
from ..core.owner import own_output
from ..deploy.onnx import WEIGHTS, export_onnx
from ..deploy.runtime import is_onnx_folder
from ..errors import SvdkitError
from ..sources.models import load_model
from .common import emit

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
        help="int8 / int4: ONNX Runtime's weight-only block quantization (blocks of 32) of every matrix, "
        "factors and dense matrices alike (default float32)",
    )
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    e.set_defaults(run=run)


def run(a: argparse.Namespace) -> None:
    if is_onnx_folder(a.model):
        raise SvdkitError(f"'{a.model}' is already an ONNX export: export the model it was made from")
    check_not_source(a.model, a.output)
    with own_output(a.output):
        out = prepare_output_dir(a.output, a.overwrite)
        model, tok = load_model(a.model, dtype="float32")
        manifest = export_onnx(model, tok, out, weights=a.weights, source=str(a.model), overwrite=a.overwrite)
    print(
        f"ONNX export ({a.weights} weights, {manifest['bytes']:,} bytes) written to {out}; logits within "
        f"{manifest['max_relative_logit_difference']:.1e} of the torch model's. Run it: svdkit eval {out}"
    )
    emit({k: v for k, v in manifest.items() if k not in ("cache", "compression")}, a.json)
