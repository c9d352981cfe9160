"""Freed memory given back to the operating system between decoder layers.

glibc's malloc raises its mmap threshold as large blocks are freed (up to 32 MiB on 64-bit), after which
buffers of a layer's size (activations, weights, float64 work) come from the heap, whose free holes it keeps:
a walk over the layers then grows in resident memory with every layer though nothing is kept.
``malloc_trim(0)`` returns those free pages; the layer engine calls :func:`trim_heap` after each layer.
Elsewhere (another libc, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import sys

__all__ = ["trim_heap"]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None
    return libc


def trim_heap() -> None:
    """Give the heap's free pages back to the operating system (glibc's malloc_trim; else nothing)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
