"""An interrupt while svdkit's command line is still starting (Python importing torch and transformers, a few
seconds in which nothing is written yet) ends in one line and exit 128 + the signal, like one at any later
instant, instead of a KeyboardInterrupt traceback or a silent kill.

Imported first by ``svdkit/__init__.py``, before anything heavy (the import guards); it acts only in a
process that runs svdkit's command line (``svdkit ...``, ``python -m svdkit``, ``python -m svdkit.cli``, as
its original argv says), never in a program that imports svdkit as a library. The command's own handlers
(:mod:`svdkit.cli`) replace these once it runs, and once it has ended :func:`hold_to_exit` keeps a late signal
from killing the process while Python shuts down."""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["guard_command_line", "hold_to_exit", "is_command_line", "starting"]

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
_MODULES = ("svdkit", "svdkit.cli")


def is_command_line(argv: list[str] | None = None) -> bool:
    """Whether the interpreter was started to run svdkit's command line (`argv`: ``sys.orig_argv``)."""
    argv = list(getattr(sys, "orig_argv", []) if argv is None else argv)
    if "-m" in argv[1:]:
        at = argv.index("-m", 1)
        return at + 1 < len(argv) and argv[at + 1] in _MODULES
    return len(argv) > 1 and os.path.basename(argv[1]) == "svdkit"


def _exit(signum: int, when: str) -> None:
    os.write(2, f"svdkit: interrupted by {signal.Signals(signum).name} {when}\n".encode())
    os._exit(128 + signum)


def starting(signum, frame) -> None:
    """The handler while the command line starts (the command's own replace it)."""
    _exit(signum, "while starting; nothing was written")


def hold_to_exit() -> None:
    """Ignore SIGINT, SIGTERM and SIGHUP for the rest of the process: once the command has ended (its output
    complete, or its error said), one that comes while Python shuts down (which gives signals their default
    actions back, except ignored ones) no longer kills it silently; the exit code stays the command's."""
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def guard_command_line() -> None:
    """In svdkit's command line, make SIGINT, SIGTERM and SIGHUP end the start-up with one line (a signal
    ignored on purpose, as under ``nohup``, stays ignored)."""
    if not is_command_line():
        return
    for sig in _SIGNALS:
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(sig, starting)


guard_command_line()
