"""Options: small dataclasses whose fields carry their help text and their check, declared once.

A field is declared with :func:`option` (default, help, check); an :class:`Options` dataclass runs
every field's check after construction (then its own :meth:`Options.check` for rules that tie fields
together), so a bad value fails the same way whether it comes from Python, the command line or a
benchmark grid. The checks (:func:`number`, :func:`integer`, :func:`choice`, :func:`boolean`,
:func:`path`, :func:`string`, :func:`strings`, :func:`mapping`) raise ValueError with one line "NAME must
be ..., got VALUE" (a bool is never a number, a float never an integer); :func:`build_config` turns
unknown keys and rejected values into an :class:`~svdkit.errors.SvdkitError` naming what was configured,
and :class:`UserOptions` (options a user makes directly) raises SvdkitError itself. :func:`check_context`
refuses a sequence length beyond a model's context.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from ..errors import SvdkitError

__all__ = [
    "Check",
    "Options",
    "UserOptions",
    "option",
    "number",
    "integer",
    "power_of_two",
    "choice",
    "boolean",
    "path",
    "string",
    "strings",
    "mapping",
    "build_config",
    "parse_assignment",
    "context_length",
    "check_context",
]

Check = Callable[[str, Any], Any]
"""check(name, value) -> the value to keep (possibly normalised); raises ValueError"""


def option(default: Any, help: str, check: Check | None = None) -> Any:
    """A dataclass field with its help text and its check (both read by :class:`Options` and the CLI)."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check})


class Options:
    """Base of the option dataclasses: checks every field declared with a check, then :meth:`check`."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            check = f.metadata.get("check")
            if check is not None:  # object.__setattr__: frozen option classes normalise too
                object.__setattr__(self, f.name, check(f.name, getattr(self, f.name)))
        self.check()

    def check(self) -> None:
        """Rules between fields (override); single fields are checked by their declared check."""


class UserOptions(Options):
    """Options a user makes directly (not through :func:`build_config`): a rejected value is an SvdkitError,
    its message prefixed by ``WHAT`` when set."""

    WHAT: ClassVar[str] = ""

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except (TypeError, ValueError) as e:
            raise SvdkitError(f"{self.WHAT}: {e}" if self.WHAT else str(e)) from e


def _bound(x: float) -> str:
    return "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:g}"


def number(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    """A finite real number in the interval [lo, hi] (ends excluded where open); (0, inf) reads "positive"."""

    left, right = "(" if lo_open else "[", ")" if hi_open or hi == math.inf else "]"
    interval = "" if lo == -math.inf and hi == math.inf else f" in {left}{_bound(lo)}, {_bound(hi)}{right}"
    positive = lo == 0 and lo_open and hi == math.inf

    def check(name: str, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(
                f"{name} must be a {'positive ' if positive else ''}number{'' if positive else interval}, got {v!r}"
            )
        if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            raise ValueError(f"{name} must be {'positive' if positive else 'a number' + interval}, got {v!r}")
        return v

    return check


def integer(minimum: int | None = None) -> Check:
    """An integer (not a bool), at least `minimum` when given."""

    def check(name: str, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum):
            what = (
                "an integer"
                if minimum is None
                else "a positive integer"
                if minimum == 1
                else f"an integer >= {minimum}"
            )
            raise ValueError(f"{name} must be {what}, got {v!r}")
        return v

    return check


def power_of_two(minimum: int) -> Check:
    """An integer power of two, at least `minimum` (a quantization block size)."""

    def check(name: str, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum or v & (v - 1):
            raise ValueError(f"{name} must be a power of two of at least {minimum}, got {v!r}")
        return v

    return check


def choice(*values: str) -> Check:
    """One of the given strings."""

    def check(name: str, v: Any) -> Any:
        if v not in values:
            listed = (
                " or ".join(repr(x) for x in values) if len(values) <= 2 else "one of " + ", ".join(map(repr, values))
            )
            raise ValueError(f"{name} must be {listed}, got {v!r}")
        return v

    return check


def boolean() -> Check:
    """True or False (JSON true/false on the command line)."""

    def check(name: str, v: Any) -> Any:
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be true or false, got {v!r}")
        return v

    return check


def path(optional: bool = True) -> Check:
    """A file path (a non-empty string or os.PathLike); None where `optional`."""

    def check(name: str, v: Any) -> Any:
        if v is None and optional:
            return v
        if not isinstance(v, str | os.PathLike) or not os.fspath(v):
            raise ValueError(f"{name} must be a file path, got {v!r}")
        return v

    return check


def string() -> Check:
    """A non-empty string (a name)."""

    def check(name: str, v: Any) -> Any:
        if not isinstance(v, str) or not v:
            raise ValueError(f"{name} must be a name (a non-empty string), got {v!r}")
        return v

    return check


def strings(optional: bool = True) -> Check:
    """A non-empty list or tuple of non-empty strings, kept as a tuple (a lone string is refused); None where
    `optional`."""

    def check(name: str, v: Any) -> Any:
        if v is None and optional:
            return v
        if not isinstance(v, list | tuple) or not v or not all(isinstance(x, str) and x for x in v):
            raise ValueError(f"{name} must be a non-empty list of names, e.g. ['q_proj', 'k_proj'], got {v!r}")
        return tuple(v)

    return check


def mapping(optional: bool = True) -> Check:
    """A mapping with string keys (options by name); None where `optional`."""

    def check(name: str, v: Any) -> Any:
        if v is None and optional:
            return v
        if not isinstance(v, Mapping) or not all(isinstance(k, str) for k in v):
            raise ValueError(f"{name} must be a mapping of option names to values, e.g. {{'alpha': 0.5}}, got {v!r}")
        return v

    return check


def build_config(cls: type, options: Mapping[str, Any] | None, what: str) -> Any:
    """`cls(**options)`; options that are not a mapping, unknown keys and rejected values become an
    SvdkitError naming `what`."""
    try:
        options = dict(mapping()("options", options) or {})
    except ValueError as e:
        raise SvdkitError(f"{what}: {e}") from e
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise SvdkitError(f"{what} has no option {', '.join(unknown)} (its options: {known})")
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise SvdkitError(f"{what}: {e}") from e


def parse_assignment(text: str) -> tuple[str, Any]:
    """'KEY=VALUE' -> (key, value), the value read as JSON when it parses (1e-5, true, [0.2, 0.4]), else a string.

    Raises ValueError for text without a key or an '='.
    """
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"options are KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def context_length(model: Any) -> int | None:
    """The model's context in tokens (its text config's ``max_position_embeddings``), or None where it
    declares none."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "max_position_embeddings", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def check_context(seqlen: int, context: int | None, what: str, flag: str) -> None:
    """SvdkitError when windows of `seqlen` tokens exceed the model's `context` (None: not known, no check);
    `what` names the windows, `flag` what to pass instead."""
    if context is not None and seqlen > context:
        raise SvdkitError(
            f"{what} of {seqlen} tokens are longer than the model's context of {context} tokens "
            f"(max_position_embeddings): pass {flag} of at most {context}"
        )
