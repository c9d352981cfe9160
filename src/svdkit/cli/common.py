"""What every subcommand shares: the parser with svdkit's error format, argument types, flags built from
option dataclasses (their help text and default declared once, in the dataclass), and JSON output."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from ..core.device import DTYPES
from ..core.options import parse_assignment
from ..core.ranks import check_ratio
from ..errors import SvdkitError

__all__ = [
    "CALIBRATION_FLAGS",
    "CURVE_FILE",
    "HEALING_FILE",
    "Parser",
    "add_dtype",
    "add_fields",
    "emit",
    "fields_from_args",
    "nonnegative",
    "option_pair",
    "positive",
    "ratio",
    "ratio_or_zero",
]

CURVE_FILE = "training_curve.json"
"""written next to a compressed model whose method trains (soco): one record per step"""
HEALING_FILE = "healing.json"
"""each healer's report with its loss curves, written beside a healed model"""


class Parser(argparse.ArgumentParser):
    """argparse with svdkit's error format: one line on stderr, exit code 2 (``--help`` shows usage)."""

    def error(self, message: str):
        self.exit(2, f"svdkit: error: {self.prog}: {message} (see '{self.prog} --help')\n")


def ratio(text: str) -> float:
    """An argparse type: a ratio in (0, 1)."""
    try:
        return check_ratio(float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"ratio must be a number in (0, 1), got {text!r}") from e
    except SvdkitError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def ratio_or_zero(text: str) -> float:
    """An argparse type: 0, or a ratio in (0, 1)."""
    try:
        if float(text) == 0.0:
            return 0.0
    except ValueError:
        pass
    return ratio(text)


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from e
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive = _int_at_least(1, "a positive integer")
nonnegative = _int_at_least(0, "an integer >= 0")


def option_pair(text: str) -> tuple[str, object]:
    """An argparse type: KEY=VALUE (see :func:`~svdkit.core.options.parse_assignment`)."""
    try:
        return parse_assignment(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_fields(
    parser: argparse.ArgumentParser,
    cls: type,
    flags: Mapping[str, Mapping[str, Any]],
    prefix: str = "",
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """One flag per field of the dataclass `cls` named in `flags`, whose value gives the flag (default
    ``--field-name``) and argparse settings; the help text and default come from the field (or `defaults`).
    The parsed value lands in ``prefix + field name``."""
    declared = {f.name: f for f in dataclasses.fields(cls)}
    for name, settings in flags.items():
        settings = dict(settings)
        flag = settings.pop("flag", "--" + name.replace("_", "-"))
        default = (defaults or {}).get(name, declared[name].default)
        help = settings.pop("help", declared[name].metadata["help"])
        if settings.get("action") == "append":
            default, help = [], help + " (repeatable)"
        elif default is not None and default is not False:
            help += f" (default {default})"
        if settings.get("action") not in ("store_true", "store_false", "append") and "choices" not in settings:
            settings.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
        parser.add_argument(flag, dest=prefix + name, default=default, help=help, **settings)


def fields_from_args(args: argparse.Namespace, cls: type, flags: Mapping[str, Any], prefix: str = "") -> dict:
    """The values :func:`add_fields` parsed, by field name (KEY=VALUE lists become dicts)."""
    out = {}
    for name, settings in flags.items():
        value = getattr(args, prefix + name)
        out[name] = dict(value) if settings.get("action") == "append" else value
    return out


def emit(obj: dict, as_json: bool) -> None:
    """With --json: print `obj` as one JSON line (the last line of standard output)."""
    if as_json:
        print(json.dumps(obj), flush=True)


CALIBRATION_FLAGS = {
    "source": {"flag": "--calib", "metavar": "SPEC"},
    "samples": {"flag": "--calib-samples", "type": positive},
    "seqlen": {"flag": "--calib-seqlen", "type": positive},
    "offset": {"flag": "--calib-offset", "type": nonnegative},
    "seed": {"flag": "--seed", "type": int},
}
"""the calibration flags, by :class:`~svdkit.pipeline.options.CalibrationSettings` field (help and default there)"""


def add_dtype(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """The ``--dtype`` flag: the dtype the model is loaded and run in (auto: the checkpoint's own)."""
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=default,
        help=f"load and run the model in this dtype; auto keeps the checkpoint's own (default {default})",
    )
