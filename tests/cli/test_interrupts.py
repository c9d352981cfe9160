"""Interrupts at exact points of a streamed compression (benchmarks/interrupts.py, a few of its points): one
line, exit 128 + the signal, only the resumable folder left, and a resume to the uninterrupted run's bytes; and
an interrupt while the command line is still importing: one line too."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "interrupts.py"


def test_interrupts_right_after_each_layer_and_the_rename_end_in_one_line_and_resume_exactly(tmp_path):
    rows_file = tmp_path / "rows.json"
    argv = [sys.executable, SCRIPT, "--layers", "2", "--events", "capture", "mark", "finish", "--timed", "0"]
    done = subprocess.run(
        [*argv, "--work", tmp_path / "work", "--json", rows_file], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(rows_file.read_text())
    assert [r["point"] for r in rows] == ["after capture #1", "after mark #1", "after mark #2", "after finish #1"]
    assert {r["signal"] for r in rows} == {"SIGINT", "SIGTERM", "SIGHUP"}
    assert all(r["verdict"] == "ok" and r["lines"] == 1 and not r["traceback"] for r in rows)
    assert [r["resumed_equal"] for r in rows] == [True, True, True, None]  # the last: the output was complete
    assert rows[-1]["message"].endswith("was already complete")


def test_only_the_command_line_guards_its_start_up():
    from svdkit.startup import is_command_line

    for argv, expected in (
        (["python", "-m", "svdkit", "compress"], True),
        (["python", "-u", "-m", "svdkit.cli", "eval"], True),
        (["/venv/bin/python", "/venv/bin/svdkit", "info", "x"], True),
        (["python", "-m", "pytest", "-q"], False),
        (["python", "train.py"], False),
        (["python", "-c", "import svdkit"], False),
    ):
        assert is_command_line(argv) is expected, argv
    code = "import signal, svdkit; print(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr  # a program importing svdkit keeps its handlers


def _default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_while_python_imports_ends_in_one_line(signum):
    """Sent as soon as ``svdkit.startup`` has run (``-X importtime`` reports each import as it ends), while Python
    still imports torch and transformers: one line, exit 128 + the signal, no traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "svdkit", "methods"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_signals,  # a test run in the background (``make test &``) ignores SIGINT: not the child
    )
    for line in proc.stderr:
        if line.rstrip().endswith("svdkit.startup"):
            proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=120)
    said = [ln for ln in err.splitlines() if not ln.startswith("import time:")]
    assert proc.returncode == 128 + signum, err[-2000:]
    assert said == [f"svdkit: interrupted by {signum.name} while starting; nothing was written"]


def test_after_the_command_a_late_signal_leaves_its_exit_code(capsys):
    """The command's handlers give way to the defaults (or, after the start-up's, Python's own); in the command
    line's process the signals are then ignored to its exit, so one that comes while Python shuts down (which
    restores the default actions of handled ones) does not kill it silently."""
    from svdkit import startup
    from svdkit.cli import main

    previous = signal.signal(signal.SIGHUP, startup.starting)
    try:
        assert main(["methods"]) == 0
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)
    code = (
        "import os, signal, sys; from svdkit.startup import hold_to_exit; hold_to_exit(); "
        "os.kill(os.getpid(), signal.SIGTERM); print('still here'); sys.exit(3)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and proc.stdout.strip() == "still here", proc.stderr
