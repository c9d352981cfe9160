"""``svdkit methods``: the compression methods and allocations, with their options and defaults."""

from __future__ import annotations

import argparse
import dataclasses

from ..allocators import ALLOCATORS
from ..methods import METHODS

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    sub.add_parser("methods", help="list the compression methods").set_defaults(run=run)


def _options(cls) -> str:
    fields = [f"{f.name}={f.default!r}" for f in dataclasses.fields(cls)]
    return f"\n{'':14s}options: {', '.join(fields)}" if fields else ""


def run(a: argparse.Namespace) -> None:
    print("methods (--method, options with --option KEY=VALUE):")
    for name in METHODS.names():
        m = METHODS.get(name)
        print(f"  {name:12s}{m.summary}" + (f"  [{m.paper}]" if m.paper else "") + _options(m.config_cls))
    print("allocations (--allocation, options with --allocation-option KEY=VALUE):")
    for name in ALLOCATORS.names():
        al = ALLOCATORS.get(name)
        print(f"  {name:12s}{al.summary}" + _options(al.config_cls))
