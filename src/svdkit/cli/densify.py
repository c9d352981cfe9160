"""``svdkit densify``: write a compressed folder as a plain dense model that any tool loads."""

from __future__ import annotations

import argparse

from ..core.atomic import check_not_source, prepare_output_dir
from ..core.owner import own_output
from ..errors import SvdkitError
from ..saved.contents import dense_bytes
from ..saved.folder import densify
from ..saved.format import read_svdkit_config
from ..sources.models import load_model

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    d = sub.add_parser("densify", help="write a compressed folder as a plain dense model")
    d.add_argument("folder")
    d.add_argument("--output", required=True)
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(run=run)


def run(a: argparse.Namespace) -> None:
    check_not_source(a.folder, a.output)
    if read_svdkit_config(a.folder) is None:
        raise SvdkitError(f"'{a.folder}' is not an svdkit-compressed model folder")
    with own_output(a.output):
        out = prepare_output_dir(a.output, a.overwrite, size=dense_bytes(a.folder) or 0)
        model, tok = load_model(a.folder)
        densify(model, tok, out, overwrite=a.overwrite, inplace=True)
    print(f"dense model written to {out}")
