"""Building a method's or an allocator's small config dataclass from user options, with clear errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .errors import SvdkitError

__all__ = ["build_config"]


def build_config(cls: type, options: Mapping[str, Any] | None, what: str) -> Any:
    """`cls(**options)`; unknown keys and rejected values become an SvdkitError naming `what`."""
    options = dict(options or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise SvdkitError(f"{what} has no option {', '.join(unknown)} (its options: {known})")
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise SvdkitError(f"{what}: {e}") from e
