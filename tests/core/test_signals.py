"""Interruptions held back while a few steps must happen together (svdkit/core/signals.py)."""

from __future__ import annotations

import os
import signal

import pytest

from svdkit.core.signals import signals_held


@pytest.fixture()
def sigint_raises():
    """Python's own SIGINT handler, also where the suite was started in the background (a shell then ignores
    SIGINT for the job, and Python leaves it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_interruption_inside_the_block_arrives_after_it(sigint_raises):
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("after the signal")
            os.kill(os.getpid(), signal.SIGINT)  # twice: delivered once
            steps.append("end of block")
    assert steps == ["after the signal", "end of block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is back


def test_the_previous_handler_gets_the_signal():
    got = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            assert got == []
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
