"""The loss-curve file a training stage writes (one JSON line per step)."""

from __future__ import annotations

from pathlib import Path
from typing import IO

from ..errors import SvdkitError

__all__ = ["open_log"]


def open_log(path: str | None, what: str) -> IO[str] | None:
    """`path` opened for writing (None: no file); an unwritable path is an SvdkitError naming `what`."""
    try:
        return Path(path).open("w") if path else None
    except OSError as e:
        raise SvdkitError(f"cannot write the {what} log {path}: {e}") from e
