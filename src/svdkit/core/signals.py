"""Holding interruptions back while a few steps must happen together (renaming a finished folder into
place): SIGINT, SIGTERM and SIGHUP that arrive meanwhile are delivered, to whatever handler was there,
once the block is done."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["HELD", "signals_held"]

HELD = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def signals_held() -> Iterator[None]:
    """Run the block without interruption by SIGINT, SIGTERM or SIGHUP; deliver any that came after it.

    Python runs signal handlers in the main thread only, so only there can a block be interrupted (and
    only there are handlers swapped); elsewhere the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {}
    for sig in HELD:
        if signal.getsignal(sig) is not None:  # None: a handler set outside Python, left alone
            previous[sig] = signal.signal(sig, lambda signum, frame: arrived.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(arrived):
            signal.raise_signal(signum)
