"""The svdkit command line: compress, eval, generate, info, densify, export, demo, methods, bench.

One module per subcommand, each with ``add_parser(subparsers)`` and ``run(args)``. Bad input, and an I/O
error (a full disk), ends with one line ``svdkit: error: ...`` on standard error and exit code 2;
``--json`` makes a command print one JSON object as the last line of standard output. SIGTERM (what
``timeout``, Docker and Slurm send) and SIGHUP stop a command as Ctrl-C does: every cleanup runs (no
temporary folder is left), one line says which signal, and the exit code is 128 + its number (while Python is
still importing, :mod:`svdkit.startup`'s handlers say so). Warnings and
log lines of other libraries (torch's ONNX exporter, ONNX Runtime's quantizer) stay out of the terminal unless
``--verbose``; svdkit's own warnings always show, as ``svdkit: warning: ...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from huggingface_hub.utils import logging as hub_logging
from safetensors import SafetensorError
from transformers.utils import logging as hf_logging

from ..core import distributed
from ..core.disk import io_reason
from ..errors import SvdkitError, SvdkitWarning
from ..startup import hold_to_exit, is_command_line, starting
from . import bench, compress, demo, densify, evaluate, export, generate, info, methods
from .common import CURVE_FILE, Parser

__all__ = ["main", "build_parser", "CURVE_FILE", "Terminated"]

COMMANDS = (compress, evaluate, info, densify, export, generate, methods, bench, demo)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="svdkit", description="SVD-based compression of causal language models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    for parser in sub.choices.values():
        parser.add_argument(
            "--verbose", action="store_true", help="show other libraries' warnings and log lines too (torch, ONNX)"
        )
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"svdkit: warning: {message}", file=sys.stderr if file is None else file)


def _show_ours(message, category, filename, lineno, file=None, line=None) -> None:
    """svdkit's own warnings only (:class:`~svdkit.errors.SvdkitWarning`)."""
    if issubclass(category, SvdkitWarning):
        _show_warning(message, category, filename, lineno, file, line)


@contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Without `verbose`: other libraries' warnings hidden and log records of level WARNING and below dropped
    (svdkit itself warns through :mod:`warnings`, never through logging)."""
    shown = warnings.showwarning
    warnings.showwarning = _show_warning if verbose else _show_ours
    if not verbose:
        logging.disable(logging.WARNING)
    try:
        yield
    finally:
        warnings.showwarning = shown
        logging.disable(logging.NOTSET)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM or SIGHUP: it unwinds like Ctrl-C, so every cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame) -> None:
    raise Terminated(signum)


@contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """While the command runs, SIGINT raises KeyboardInterrupt and SIGTERM and SIGHUP raise :class:`Terminated`
    (where they have their default action or the start-up's: a signal ignored on purpose, as under ``nohup``,
    stays ignored); afterwards their default actions again."""
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for sig, handler, default in (
            (signal.SIGINT, signal.default_int_handler, signal.default_int_handler),
            (signal.SIGTERM, _terminate, signal.SIG_DFL),
            (getattr(signal, "SIGHUP", None), _terminate, signal.SIG_DFL),
        ):
            if sig is not None and (previous := signal.getsignal(sig)) in (default, starting):
                signal.signal(sig, handler)
                installed[sig] = (handler, previous)
    try:
        yield
    finally:
        for sig, (handler, previous) in installed.items():
            if signal.getsignal(sig) is handler:  # not changed meanwhile (the command line's end ignores them)
                signal.signal(sig, default_action(sig) if previous is starting else previous)


def default_action(sig: int):
    """What a signal does by default in Python: SIGINT raises KeyboardInterrupt, the others their OS default."""
    return signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL


def _interrupted(e: KeyboardInterrupt) -> int:
    signum = getattr(e, "signum", signal.SIGINT)
    note = f"; {e.note}" if getattr(e, "note", None) else ""
    print(f"svdkit: interrupted by {signal.Signals(signum).name}{note}", file=sys.stderr)
    return 128 + signum


def main(argv: Sequence[str] | None = None) -> int:
    with _signals_as_interrupts():
        try:
            a = build_parser().parse_args(argv)
            hf_logging.set_verbosity_error()
            hub_logging.set_verbosity_error()
            with _quiet(a.verbose):
                code = _run(a)
            _ended()
            return code
        except KeyboardInterrupt as e:  # before or after the command's own work
            _ended()
            return _interrupted(e)


def _ended() -> None:
    """In the command line's own process, ignore SIGINT, SIGTERM and SIGHUP from here to its exit: Python's
    shutdown gives them their default actions again, which would kill it without a word."""
    if is_command_line():
        hold_to_exit()


def _run(a: argparse.Namespace) -> int:
    """The command, its failures each one line (an interrupt: :func:`main`'s)."""
    try:
        a.run(a)
    except SvdkitError as e:
        print(f"svdkit: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if (why := distributed.peer_gone(e)) is None:
            raise
        print(f"svdkit: error: {why}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, SafetensorError) as e:  # what no check foresaw: a disk filled up while writing
        print(f"svdkit: error: {io_reason(e)}", file=sys.stderr)
        return 2
    return 0
