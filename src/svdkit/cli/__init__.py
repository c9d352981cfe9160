"""The svdkit command line: compress, eval, generate, info, densify, demo, methods, bench.

One module per subcommand, each with ``add_parser(subparsers)`` and ``run(args)``. Bad input ends with
one line ``svdkit: error: ...`` on standard error and exit code 2; ``--json`` makes a command print one
JSON object as the last line of standard output.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from huggingface_hub.utils import logging as hub_logging
from transformers.utils import logging as hf_logging

from ..errors import SvdkitError
from . import bench, compress, demo, densify, evaluate, generate, info, methods
from .common import CURVE_FILE, Parser

__all__ = ["main", "build_parser", "CURVE_FILE"]

COMMANDS = (compress, evaluate, info, densify, generate, methods, bench, demo)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="svdkit", description="SVD-based compression of causal language models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"svdkit: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    hf_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    warnings.showwarning = _show_warning
    try:
        a.run(a)
    except SvdkitError as e:
        print(f"svdkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("svdkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0
